"""Single-image training transforms: each takes one `Sample` and returns one (numpy/cv2, no torch).

Behaviour follows MMDetection 3.x / mmcv 2.x (RandomResize, RandomCrop, YOLOXHSVRandomAug, RandomFlip, Pad),
written anew. Every random transform draws from its own `numpy.random.Generator` (`self.rng`), which the
pipeline re-seeds per worker process, so augmentation is reproducible for a seed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from model.data.sample import Sample

PAD_VALUE = 114


class RandomTransform:
    """A transform with its own RNG."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng if rng is not None else np.random.default_rng()

    def reseed(self, seed: int | Sequence[int] | np.random.SeedSequence) -> None:
        self.rng = np.random.default_rng(seed)


def rescale_size(w: int, h: int, target: int) -> tuple[int, int]:
    """mmcv `rescale_size` for a square target with keep_ratio: fit the long edge and the short edge in `target`."""
    scale = min(target / max(h, w), target / min(h, w))
    return int(w * scale + 0.5), int(h * scale + 0.5)


def resize_sample(sample: Sample, new_w: int, new_h: int) -> Sample:
    """Resize image (bilinear) and boxes; boxes clipped to the new image (mmcv `clip_object_border=True`)."""
    h, w = sample.img.shape[:2]
    img = cv2.resize(sample.img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    boxes = sample.boxes * np.array([new_w / w, new_h / h, new_w / w, new_h / h], np.float32)
    boxes = clip_boxes(boxes, new_w, new_h)
    return sample.replace(img=img, boxes=boxes)


def clip_boxes(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    out = boxes.copy()
    out[:, 0::2] = out[:, 0::2].clip(0, w)
    out[:, 1::2] = out[:, 1::2].clip(0, h)
    return out


class RandomResize(RandomTransform):
    """Keep-ratio resize to a square scale `scale * r`, r ~ U(ratio_range) (mmcv RandomResize + Resize)."""

    def __init__(self, scale: int, ratio_range: tuple[float, float], rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.scale = scale
        self.ratio_range = ratio_range

    def __call__(self, sample: Sample) -> Sample:
        ratio = self.rng.uniform(*self.ratio_range)
        target = int(self.scale * ratio)
        h, w = sample.img.shape[:2]
        new_w, new_h = rescale_size(w, h, target)
        return resize_sample(sample, max(new_w, 1), max(new_h, 1))


class RandomCrop(RandomTransform):
    """Crop `crop_size` x `crop_size` at a random offset (the whole axis when the image is smaller).

    Boxes are shifted and clipped; boxes left with no area are dropped. MMDetection returns None when no box
    survives and its dataset then retries with another image; here the crop position is re-drawn up to
    `max_tries` times instead, and an empty crop is returned if none keeps a box (a valid all-background sample).
    """

    def __init__(self, crop_size: int, max_tries: int = 10, rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.crop_size = crop_size
        self.max_tries = max_tries

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample.img.shape[:2]
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        for _ in range(self.max_tries):
            y0 = int(self.rng.integers(0, h - ch + 1))
            x0 = int(self.rng.integers(0, w - cw + 1))
            boxes = sample.boxes - np.array([x0, y0, x0, y0], np.float32)
            boxes = clip_boxes(boxes, cw, ch)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if keep.any() or len(sample.boxes) == 0:
                break
        img = sample.img[y0:y0 + ch, x0:x0 + cw]
        return sample.replace(img=np.ascontiguousarray(img), boxes=boxes[keep], labels=sample.labels[keep])


class YOLOXHSVRandomAug(RandomTransform):
    """YOLOX colour jitter: each of H, S, V shifted by U(-1,1)*delta, each shift applied with probability 1/2."""

    def __init__(self, hue_delta: int = 5, saturation_delta: int = 30, value_delta: int = 30,
                 rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.deltas = np.array([hue_delta, saturation_delta, value_delta], np.float64)

    def __call__(self, sample: Sample) -> Sample:
        gains = self.rng.uniform(-1, 1, 3) * self.deltas * self.rng.integers(0, 2, 3)
        gains = gains.astype(np.int16)
        if not gains.any():
            return sample
        hsv = cv2.cvtColor(sample.img, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + gains[0]) % 180  # OpenCV hue is 0..179 for uint8
        hsv[..., 1] = np.clip(hsv[..., 1] + gains[1], 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + gains[2], 0, 255)
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
        return sample.replace(img=img)


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


class RandomFlip(RandomTransform):
    """Horizontal flip with probability `prob`."""

    def __init__(self, prob: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.prob = prob

    def __call__(self, sample: Sample) -> Sample:
        if self.rng.random() >= self.prob:
            return sample
        w = sample.img.shape[1]
        return sample.replace(img=cv2.flip(sample.img, 1), boxes=hflip_boxes(sample.boxes, w))


class Pad:
    """Pad bottom and right to `size` x `size` with `pad_value` (boxes unchanged)."""

    def __init__(self, size: int, pad_value: int = PAD_VALUE):
        self.size = size
        self.pad_value = pad_value

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample.img.shape[:2]
        if h == self.size and w == self.size:
            return sample
        if h > self.size or w > self.size:
            raise ValueError(f"Pad({self.size}) got a larger image {w}x{h}; crop or resize first")
        img = np.full((self.size, self.size, 3), self.pad_value, np.uint8)
        img[:h, :w] = sample.img
        return sample.replace(img=img)


class FilterDegenerate:
    """Drop boxes whose width or height is not above `min_size` pixels (MMDetection FilterAnnotations rule)."""

    def __init__(self, min_size: float = 1.0):
        self.min_size = min_size

    def __call__(self, sample: Sample) -> Sample:
        b = sample.boxes
        keep = ((b[:, 2] - b[:, 0]) > self.min_size) & ((b[:, 3] - b[:, 1]) > self.min_size)
        if keep.all():
            return sample
        return sample.replace(boxes=b[keep], labels=sample.labels[keep])


class Compose:
    """Apply transforms in order; `reseed` gives every random transform an independent stream of one seed."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def reseed(self, seed: int | Sequence[int]) -> None:
        children = np.random.SeedSequence(seed).spawn(len(self.transforms))
        for t, child in zip(self.transforms, children, strict=True):
            if hasattr(t, "reseed"):
                t.reseed(child)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"
