"""The one table of official RTMDet sizes, and the typed test-time settings.

Numbers come from MMDetection 3.3.0's `configs/rtmdet/rtmdet_<size>_8xb32-300e_coco.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

SIZES = ("tiny", "s", "m", "l", "x")
STRIDES = (8, 16, 32)
# Which weights of a training checkpoint to use (model.checkpoint explains the layout); here, not there, because
# the command line offers them and must not import torch to do so.
WEIGHTS_KEYS = ("ema", "raw")

# ImageNet statistics in BGR order: MMDetection's RTMDet feeds cv2's BGR images unflipped.
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
PIXEL_STD_BGR = (57.375, 57.12, 58.395)
PAD_VALUE = 114
Canvas = Literal["square", "tight"]  # TestConfig.canvas (model.inference.preprocess)
CANVASES = get_args(Canvas)
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers for one size."""

    name: str
    deepen_factor: float
    widen_factor: float
    neck_csp_blocks: int
    exp_on_reg: bool
    published_params: int  # `sum(p.numel() for p in model.parameters())` of the official build

    @property
    def neck_in_channels(self) -> tuple[int, int, int]:
        return tuple(int(c * self.widen_factor) for c in (256, 512, 1024))  # type: ignore[return-value]

    @property
    def head_channels(self) -> int:
        return self.neck_in_channels[0]


MODEL_SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny", 0.167, 0.375, 1, False, 4_896_168),
    "s": ModelSpec("s", 0.33, 0.5, 1, False, 8_886_924),
    "m": ModelSpec("m", 0.67, 0.75, 2, True, 24_709_188),
    "l": ModelSpec("l", 1.0, 1.0, 3, True, 52_315_804),
    "x": ModelSpec("x", 1.33, 1.25, 4, True, 94_855_572),
}


def model_spec(size: str) -> ModelSpec:
    try:
        return MODEL_SPECS[size]
    except KeyError:
        raise ValueError(f"unknown RTMDet size {size!r}; choose one of {', '.join(SIZES)}") from None


@dataclass(frozen=True)
class TestConfig:
    """The letterbox and post-processing settings; defaults are the official evaluation ones (`test_cfg`).

    `canvas`: `square` pads every image to input_size x input_size (the official test pipeline); `tight` pads
    the resized image only up to a multiple of the largest stride, so a 4:3 image runs at 640 x 480
    (model.inference.preprocess)."""

    __test__ = False  # not a pytest test class, despite the name

    input_size: int = 640
    score_thr: float = 0.001
    nms_pre: int = 30000
    iou_thr: float = 0.65
    max_per_img: int = 300
    canvas: Canvas = "square"

    def __post_init__(self) -> None:
        if self.canvas not in CANVASES:
            raise ValueError(f"canvas must be one of {', '.join(CANVASES)}, got {self.canvas!r}")

    @classmethod
    def serving(cls, **overrides) -> TestConfig:
        """Thresholds for serving: only confident boxes, so post-processing stays cheap."""
        base = dict(score_thr=0.3, nms_pre=1000, max_per_img=100)
        base.update(overrides)
        return cls(**base)
