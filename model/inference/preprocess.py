"""Letterbox and normalise: the official RTMDet test pipeline, batched.

cv2 images are BGR and stay BGR (MMDetection's RTMDet does not flip channels).

Two canvases (`TestConfig.canvas`): `square`, the official pipeline's (the resized image padded to size x size),
and `tight`, the resized image padded only up to a multiple of the network's largest stride (what MMDetection's
data preprocessor does without the pipeline's fixed `Pad`). A 4:3 photo at 640 is then 640 x 480, a quarter
fewer pixels for the network; a batch of images of different shapes shares the smallest canvas that holds them all.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from model.config import PAD_VALUE, PIXEL_MEAN_BGR, PIXEL_STD_BGR


@dataclass(frozen=True)
class LetterboxInfo:
    """How one original image sits in the padded square: enough to map boxes back."""

    orig_h: int
    orig_w: int
    scale_w: float  # resized width / original width
    scale_h: float

    def for_original(self, height: int, width: int) -> LetterboxInfo:
        """This letterbox seen from the `height` x `width` original that the letterboxed image was scaled
        from (a JPEG decoded at reduced scale), so that boxes map back to the original's pixels."""
        return LetterboxInfo(height, width, self.scale_w * self.orig_w / width, self.scale_h * self.orig_h / height)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """MMDetection's keep-ratio rule: long side to `size`, rounded half up."""
    s = min(size / max(h, w), size / min(h, w))
    return max(int(h * s + 0.5), 1), max(int(w * s + 0.5), 1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def canvas_shape(resized_h: int, resized_w: int, size: int, multiple: int | None) -> tuple[int, int]:
    """The canvas a `resized_h` x `resized_w` image is padded to: size x size, or with `multiple` (the `tight`
    canvas) each side rounded up to a multiple of it."""
    if multiple is None:
        return size, size
    return round_up(resized_h, multiple), round_up(resized_w, multiple)


def letterbox(image: np.ndarray, size: int = 640, multiple: int | None = None) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize (bilinear) keeping the aspect ratio, pad bottom/right with 114 to size x size (or, with
    `multiple`, to the resized shape rounded up to multiples of it: the `tight` canvas)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 BGR image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("image has zero width or height")
    nh, nw = resized_shape(h, w, size)
    resized = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((*canvas_shape(nh, nw, size, multiple), 3), PAD_VALUE, dtype=np.uint8)
    canvas[:nh, :nw] = resized
    return canvas, LetterboxInfo(h, w, nw / w, nh / h)


class Normalizer:
    """uint8 (B, H, W, 3) BGR -> normalised float (B, 3, H, W) on the device, in one fused step."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.mean = torch.tensor(PIXEL_MEAN_BGR, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.inv_std = (1.0 / torch.tensor(PIXEL_STD_BGR, device=device, dtype=torch.float32)).view(1, 3, 1, 1)

    def __call__(self, batch_hwc: torch.Tensor) -> torch.Tensor:
        x = batch_hwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - self.mean) * self.inv_std).to(self.dtype)
        # permute() already gives a channels_last-strided view; keep it only when asked for.
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


def orientation_groups(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of the landscape (and square) and of the portrait `(height, width)` shapes, each group in order,
    empty groups left out. On the `tight` canvas a batch runs one forward per group: one canvas holding a 4:3
    landscape and a 4:3 portrait image is the full square, so every image would lose what `tight` saves."""
    groups: tuple[list[int], list[int]] = ([], [])
    for i, (h, w) in enumerate(shapes):
        groups[h > w].append(i)
    return [g for g in groups if g]


def stack_letterboxed(canvases: Sequence[np.ndarray], pin_memory: bool = False) -> torch.Tensor:
    """(B, H, W, 3): canvases of different shapes (`tight` ones) padded bottom/right to the largest."""
    batch = join_batches([torch.from_numpy(c)[None] for c in canvases])
    return batch.pin_memory() if pin_memory else batch


def join_batches(batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Letterboxed uint8 batches (B_i, H_i, W_i, 3) as one, each padded bottom/right to the largest canvas
    (the padding is the letterbox's own grey, so an image's boxes do not move)."""
    if len(batches) == 1:
        return batches[0]
    h, w = max(b.shape[1] for b in batches), max(b.shape[2] for b in batches)
    if all(b.shape[1:3] == (h, w) for b in batches):
        return torch.cat(list(batches))
    out = torch.full((sum(b.shape[0] for b in batches), h, w, 3), PAD_VALUE, dtype=torch.uint8,
                     device=batches[0].device)
    start = 0
    for b in batches:
        out[start:start + b.shape[0], :b.shape[1], :b.shape[2]] = b
        start += b.shape[0]
    return out
