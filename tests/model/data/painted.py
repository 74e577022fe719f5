"""Test images whose boxes are filled rectangles of distinct pure colours, and a check that boxes still cover
exactly the pixels of their colour after a transform."""
from __future__ import annotations

import numpy as np

from model.data.sample import Sample

# Pure colours, far apart from each other, from black (background) and from the 114 pad grey; edge pixels blended
# by resizing land between palette entries and match none of them.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 255, 255]], np.int16)


def painted_sample(h: int, w: int, boxes: list[tuple[float, float, float, float]], labels: list[int],
                   image_id: int = 0) -> Sample:
    """Black image with box i filled (integer pixel edges) in PALETTE[labels[i]]."""
    img = np.zeros((h, w, 3), np.uint8)
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        img[int(y1):int(y2), int(x1):int(x2)] = PALETTE[label]
    return Sample(img=img, boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
                  image_id=image_id)


def colour_mask(img: np.ndarray, label: int, tol: int = 60) -> np.ndarray:
    return np.abs(img.astype(np.int16) - PALETTE[label]).max(axis=2) < tol


def assert_boxes_cover_their_pixels(sample: Sample, tol: int = 60, margin: float = 2.0) -> None:
    """Every box covers its colour: >= 85% of the pixels well inside are its colour, and (almost) none of its
    colour lies outside it; and every colour visible in more than a few pixels has its box."""
    img = sample.img
    h, w = img.shape[:2]
    assert sample.boxes.dtype == np.float32 and sample.labels.dtype == np.int64
    assert len(sample.boxes) == len(sample.labels)
    assert np.all(sample.boxes[:, 0] >= 0) and np.all(sample.boxes[:, 1] >= 0)
    assert np.all(sample.boxes[:, 2] <= w) and np.all(sample.boxes[:, 3] <= h)
    assert np.all(sample.boxes[:, 2] > sample.boxes[:, 0]) and np.all(sample.boxes[:, 3] > sample.boxes[:, 1])
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = xx + 0.5, yy + 0.5  # pixel centres
    for label in range(len(PALETTE)):
        mask = colour_mask(img, label, tol)
        rows = np.flatnonzero(sample.labels == label)
        if not len(rows):
            if mask.sum() > 4:  # allowed only as a sliver a degenerate-box filter may drop
                ys, xs = np.nonzero(mask)
                thin = min(xs.max() - xs.min(), ys.max() - ys.min()) <= 2
                assert thin, f"colour {label} visible in {mask.sum()} px but has no box"
            continue
        outside_all = np.ones((h, w), bool)  # a colour may have several boxes (a mosaic can repeat an image)
        for row in rows:
            x1, y1, x2, y2 = sample.boxes[row]
            inner = (cx > x1 + margin) & (cx < x2 - margin) & (cy > y1 + margin) & (cy < y2 - margin)
            if inner.sum() >= 4:
                frac = mask[inner].mean()
                assert frac >= 0.85, f"box {label} {sample.boxes[row]}: only {frac:.2f} of its inside is its colour"
            outside_all &= (cx < x1 - margin) | (cx > x2 + margin) | (cy < y1 - margin) | (cy > y2 + margin)
        stray = int((mask & outside_all).sum())
        assert stray <= 2, f"colour {label}: {stray} px lie outside its boxes {sample.boxes[rows].tolist()}"
