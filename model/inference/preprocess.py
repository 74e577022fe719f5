"""Letterbox and normalise: the official RTMDet test pipeline, batched.

cv2 images are BGR and stay BGR (MMDetection's RTMDet does not flip channels).
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


def letterbox(image: np.ndarray, size: int = 640) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize (bilinear) keeping the aspect ratio, pad bottom/right with 114 to size x size."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 BGR image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("image has zero width or height")
    nh, nw = resized_shape(h, w, size)
    resized = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
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


def stack_letterboxed(canvases: Sequence[np.ndarray], pin_memory: bool = False) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(canvases))
    return batch.pin_memory() if pin_memory else batch
