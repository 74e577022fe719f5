"""Detections of one image, and the per-request choices that cut them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """Detections of one image: boxes are xyxy in the original image's pixels, sorted by score."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64
    class_names: list[str] = field(default_factory=list)  # one per detection

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_list(self) -> list[dict]:
        # Rounded in numpy, then one tolist() each: a Python round() per number cost 0.6 ms for 100 boxes on
        # the event loop (0.08 ms now; the same numbers on 2 million float32 values checked against round()).
        boxes = np.round(np.asarray(self.boxes, dtype=np.float64), 2).tolist()
        scores = np.round(np.asarray(self.scores, dtype=np.float64), 4).tolist()
        return [{"box": b, "score": s, "label": lbl, "class_name": n}
                for b, s, lbl, n in zip(boxes, scores, np.asarray(self.labels).tolist(), self.class_names)]


@dataclass(frozen=True)
class DetectParams:
    """What one image's caller asks for: its score threshold and classes (applied to its candidates before NMS,
    which leaves its other boxes' fate unchanged) and how many of the best it keeps."""

    score_threshold: float
    max_detections: int
    class_ids: frozenset[int] | None = None  # None: every class
