"""The Runner protocol: what differs between engines (eager, TorchScript, CUDA graphs, ONNX Runtime, Triton).

A runner takes the letterboxed uint8 batch (B, S, S, 3) BGR (or (B, H, W, 3) on the `tight` canvas, where
`NetworkInfo.fixed_input_size` is False) and returns the network's raw outputs; it
never sees an original image or a detection threshold: `model.inference.transform` owns everything
before and after it. Three output kinds exist, one per kind of exported graph, and a fourth, the head maps
with the box branch left for post-processing to run at the candidates alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from model.config import PAD_VALUE, STRIDES

if TYPE_CHECKING:
    from model.inference.sparse_regression import PointRegressor


class HeadOutputs(NamedTuple):
    """Per-level head maps: (B, C, H, W) class logits and (B, 4, H, W) box distances."""

    cls_scores: list[torch.Tensor]
    bbox_preds: list[torch.Tensor]


class SparseHeadOutputs(NamedTuple):
    """Per-level class logits (B, C, H, W) and the neck's features (B, F, H, W) the box branch starts from; the
    box branch runs at the candidates only, through `regressor` (model.inference.sparse_regression)."""

    cls_scores: list[torch.Tensor]
    box_features: list[torch.Tensor]
    regressor: PointRegressor


class DecodedOutputs(NamedTuple):
    """All levels decoded inside the graph: (B, N, 4) xyxy on the canvas and (B, N, C) probabilities."""

    boxes: torch.Tensor
    scores: torch.Tensor


class EndToEndOutputs(NamedTuple):
    """NMS inside the graph (MMDeploy end-to-end): (B, K, 5) x1, y1, x2, y2, score on the canvas; (B, K) labels."""

    dets: torch.Tensor
    labels: torch.Tensor


RunnerOutputs = HeadOutputs | SparseHeadOutputs | DecodedOutputs | EndToEndOutputs


@dataclass(frozen=True)
class NetworkInfo:
    """What a runner knows about the network it runs."""

    size: str  # "tiny", ..., or "unknown" for a foreign export
    class_names: tuple[str, ...]
    backend: str  # "torch", "onnx", "triton"
    device: str
    dtype: str = "float32"
    strides: tuple[int, ...] = STRIDES
    input_size: int | None = None  # the canvas side it was trained or exported at (None: not known)
    fixed_input_size: bool = False  # True when the graph only takes `input_size` (an export with static shape)
    square_only: bool = False  # the engine takes only square canvases (a runtime runner exported for the square)
    weights_sha256: str | None = None
    accelerate: str | None = None  # the torch runner's mode (eager, onednn, cudagraph)
    sparse_regression: bool = False  # the box branch at the candidates only (model.inference.sparse_regression)

    @property
    def name(self) -> str:
        return f"rtmdet-{self.size}"


class Runner(Protocol):
    """uint8 batch -> raw outputs. `forward` is only ever called from one thread at a time, unless the runner has
    a true `overlapping_calls` attribute (`Detector.overlapping_calls`)."""

    info: NetworkInfo
    device: torch.device  # where its outputs live (the transform post-processes there)

    def forward(self, batch_uint8: torch.Tensor) -> RunnerOutputs: ...

    def warmup(self, batch_sizes: Sequence[int], input_size: int) -> None:
        """Pay lazy allocations, kernel choices, trace profiling and graph captures before traffic."""
        ...

    def is_ready(self) -> bool:
        """False while a remote engine is away; local runners are always ready."""
        ...

    def close(self) -> None:
        """Release what the runner holds (sessions, connections, threads); idempotent."""
        ...


def blank_batch(batch_size: int, height: int, width: int | None = None) -> torch.Tensor:
    """A batch of padding-grey canvases, height x width (square without `width`): what warm-ups run (real pixel
    values, no special cases)."""
    return torch.full((batch_size, height, width or height, 3), PAD_VALUE, dtype=torch.uint8)
