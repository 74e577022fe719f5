"""Boxes and labels drawn on a BGR image (for humans: the CLI's --out and the service's /detect/render)."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np


def _color(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image: np.ndarray, dets) -> np.ndarray:
    """A copy of `image` with each detection's box, class name and score drawn."""
    out = image.copy()
    thick = max(1, round(min(out.shape[:2]) / 300))
    for box, score, label, name in zip(dets.boxes, dets.scores, dets.labels, dets.class_names):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = _color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
        text = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), color, -1)
        cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out
