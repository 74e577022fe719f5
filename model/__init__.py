"""RTMDet in plain PyTorch: the network, official checkpoints, and batched inference.

The names below are loaded on first use (PEP 562), not when the package is imported: importing any submodule
(`model.config`, `model.cli_support`, ...) runs this file, and importing torch with it would cost every
command-line start, `rtmdet --help` and argument errors included, ~4 s on a small machine. It would also load
OpenMP before `rtmdet serve` can set its wait policy, which then costs a re-exec of the whole process.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "CheckpointError": "model.errors", "load_checkpoint": "model.checkpoint", "save_checkpoint": "model.checkpoint",
    "COCO_CLASSES": "model.classes",
    "MODEL_SPECS": "model.config", "SIZES": "model.config", "TestConfig": "model.config",
    "Detections": "model.inference.detector", "Detector": "model.inference.detector",
    "RTMDet": "model.nn.rtmdet", "build_rtmdet": "model.nn.rtmdet", "fused_for_inference": "model.nn.rtmdet",
}
__all__ = ["COCO_CLASSES", "MODEL_SPECS", "SIZES", "CheckpointError", "Detections", "Detector", "RTMDet",
           "TestConfig", "build_rtmdet", "fused_for_inference", "load_checkpoint", "save_checkpoint"]

if TYPE_CHECKING:
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.classes import COCO_CLASSES
    from model.config import MODEL_SPECS, SIZES, TestConfig
    from model.errors import CheckpointError
    from model.inference.detector import Detections, Detector
    from model.nn.rtmdet import RTMDet, build_rtmdet, fused_for_inference


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
