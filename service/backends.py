"""Backends: what the batcher runs a batch on.

The interface is the split steps of `model.Detector`, so that an ONNX Runtime or Triton backend can
reuse the CPU pre- and post-processing and replace only `forward`:

- `preprocess(images) -> (batch, infos)`: BGR uint8 images -> uint8 (B, S, S, 3) letterboxed tensor and
  one `LetterboxInfo` per image. Called per request on the decode thread pool; the batcher
  concatenates the per-request tensors along dim 0.
- `forward(batch) -> (cls_scores, bbox_preds)`: the network on a batch; one call per batch, only ever
  from the batcher's single inference thread.
- `postprocess(cls_scores, bbox_preds, infos, cfg) -> list[Detections]`: decode + NMS for the batch.
- `describe() -> dict`: name, size, classes, input_size, device, dtype, weights_sha256, backend.
- `is_ready() -> bool`: loaded and warmed.
- `warmup(batch_sizes)`: pay lazy allocations before traffic.
- `test_config`: the `TestConfig` the backend was built with (input size, NMS settings).

`RTMDET_BACKEND` picks one: `torch` (in-process `model.Detector`), `onnx` (`service.backends_onnx`) or
`triton` (`service.backends_triton`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from model.config import TestConfig
from model.inference.detector import Detections, Detector
from model.inference.preprocess import LetterboxInfo
from service.settings import ServiceSettings


class BackendUnavailable(RuntimeError):
    """The configured backend cannot be built (not implemented yet, or its weights fail to load)."""


class Backend(Protocol):
    test_config: TestConfig

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[LetterboxInfo]]: ...

    def forward(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def postprocess(self, cls_scores, bbox_preds, infos: Sequence[LetterboxInfo],
                    cfg: TestConfig | None = None) -> list[Detections]: ...

    def describe(self) -> dict: ...

    def is_ready(self) -> bool: ...

    def warmup(self, batch_sizes: Sequence[int]) -> None: ...


class TorchBackend:
    """The in-process PyTorch `model.Detector`."""

    name = "torch"

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.test_config = detector.cfg
        self._ready = False

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> TorchBackend:
        from model.checkpoint import CheckpointError
        from model.zoo import resolve_weights

        try:
            weights = resolve_weights(settings.weights, kind="detector", size=settings.size)
            detector = Detector.from_checkpoint(weights, size=settings.size, device=settings.device,
                                                classes=settings.class_names, fp16=settings.fp16,
                                                weights_key=settings.weights_key)
        except (CheckpointError, ValueError) as exc:
            raise BackendUnavailable(str(exc)) from None
        detector.cfg = detector.with_config(score_thr=settings.score_threshold,
                                            input_size=settings.input_size or detector.input_size,
                                            max_per_img=settings.max_detections_limit)
        return cls(detector)

    def preprocess(self, images):
        return self.detector.preprocess(images)

    def forward(self, batch):
        return self.detector.forward(batch)

    def postprocess(self, cls_scores, bbox_preds, infos, cfg=None):
        return self.detector.postprocess(cls_scores, bbox_preds, infos, cfg)

    def describe(self) -> dict:
        return {**self.detector.describe(), "backend": self.name}

    def is_ready(self) -> bool:
        return self._ready

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        self.detector.warmup(batch_sizes)
        self._ready = True

    def mark_ready(self) -> None:
        """For a service started without warm-up."""
        self._ready = True


def create_backend(settings: ServiceSettings) -> Backend:
    if settings.backend == "torch":
        return TorchBackend.from_settings(settings)
    if settings.backend == "onnx":
        from service.backends_onnx import OnnxBackend
        return OnnxBackend.from_settings(settings)
    if settings.backend == "triton":
        from service.backends_triton import TritonBackend
        return TritonBackend.from_settings(settings)
    raise BackendUnavailable(f"backend {settings.backend!r} is not available yet; use RTMDET_BACKEND=torch")
