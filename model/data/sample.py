"""The unit every dataset returns and every transform takes and returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One training image with its annotations.

    `img` is H x W x 3 uint8 BGR (as cv2 reads it); `boxes` (N, 4) float32 xyxy in `img` pixels;
    `labels` (N,) int64 contiguous class indices (0..num_classes-1).
    """

    img: np.ndarray
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    image_id: int = -1

    def replace(self, **changes) -> Sample:
        values = {"img": self.img, "boxes": self.boxes, "labels": self.labels, "image_id": self.image_id}
        values.update(changes)
        return Sample(**values)
