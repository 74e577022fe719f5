"""The in-process runner: the RTMDet module run eager, compiled, through ONNX Runtime/OpenVINO, or as CUDA graphs.

The engines themselves live in `model.inference.accelerate` (and the measured `auto` choice in
`model.inference.runner_choice`); this only puts them behind the Runner protocol.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from model.inference.accelerate import build_runner, resolve_mode
from model.inference.low_precision import Calibration, check_available
from model.inference.modes import EXPORTED_MODES, LOW_PRECISION_MODES
from model.inference.preprocess import Normalizer
from model.inference.runner import HeadOutputs, NetworkInfo, SparseHeadOutputs, blank_batch
from model.inference.runner_choice import CANDIDATES as AUTO_CANDIDATES
from model.inference.runner_choice import AutoChoice, choose_runner
from model.inference.sparse_regression import ClassesFirst, PointRegressor
from model.nn.rtmdet import RTMDet, fused_for_inference


class TorchRunner:
    """An RTMDet module on a device, in float32 or float16, optionally channels_last and accelerated."""

    def __init__(self, model: RTMDet, class_names: Sequence[str], device: torch.device, fp16: bool = False,
                 fuse: bool = True, channels_last: bool | None = None, accelerate: str | None = None,
                 weights_sha256: str | None = None, input_size: int | None = None,
                 auto_candidates: Sequence[str] = AUTO_CANDIDATES, calibration=None,
                 auto_choices_file: str | Path | None = None, sparse_regression: bool = False,
                 any_canvas: bool = False) -> None:
        self.device = device
        self.fp16 = bool(fp16 and device.type == "cuda")
        self.dtype = torch.float16 if self.fp16 else torch.float32
        # channels_last helps oneDNN's CPU convolutions too (RTMDet-tiny, 1 thread: 202 ms vs 230 ms NCHW).
        self.channels_last = True if channels_last is None else channels_last
        self.accelerate = resolve_mode(accelerate, device)
        self.calibration = Calibration.of(calibration)  # for openvino-int8 (model.inference.low_precision)
        check_available(self.accelerate, self.calibration)  # at start-up, not on the first batch
        if self.accelerate == "cudagraph":
            torch.backends.cudnn.benchmark = True  # shapes are fixed per captured bucket: let cuDNN time kernels
        net = fused_for_inference(model) if fuse else model.eval()
        net = net.to(device, dtype=self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.network = net.eval()
        # Sparse box regression (model.inference.sparse_regression): the engines run the network without its box
        # branch, which post-processing runs at the candidates alone. On the CPU in float32, for the runners
        # `auto` picks from (reduced precision keeps the graph whose accuracy was measured; on CUDA the dense
        # branch costs little and points would cost host synchronisations).
        self.sparse_regression = bool(sparse_regression) and device.type == "cpu" and \
            self.accelerate not in LOW_PRECISION_MODES
        self.regressor = PointRegressor(self.network.bbox_head) if self.sparse_regression else None
        self.engine_network = ClassesFirst(self.network).eval() if self.sparse_regression else self.network
        self.normalize = Normalizer(device, self.dtype, self.channels_last)
        self._engine = None  # built on the first forward, when the input shape is known
        self.auto_candidates = tuple(auto_candidates)
        self.auto_choices_file = auto_choices_file  # earlier processes' choices (model.inference.choice_store)
        self.auto_choice: AutoChoice | None = None
        # The runtimes' export takes any height and width only when asked (the tight canvas): it costs the export
        # ~2.5 s more. Without it, a runner that may be a runtime takes only the square.
        self.any_canvas = bool(any_canvas)
        square_only = not self.any_canvas and self.accelerate in ("auto", *EXPORTED_MODES)
        self.info = NetworkInfo(size=model.size, class_names=tuple(class_names), backend="torch",
                                device=str(device), dtype=str(self.dtype).replace("torch.", ""),
                                strides=tuple(model.bbox_head.strides), input_size=input_size,
                                weights_sha256=weights_sha256, accelerate=self.accelerate,
                                sparse_regression=self.sparse_regression, square_only=square_only)

    def with_input_size(self, input_size: int) -> None:
        self.info = replace(self.info, input_size=input_size)

    def _build(self, example_uint8: torch.Tensor | None, auto_examples: Sequence[torch.Tensor] = ()):
        if self.accelerate == "auto":
            engine, self.auto_choice = choose_runner(self.engine_network, self.normalize, list(auto_examples) or
                                                     [example_uint8], self.info.strides,
                                                     candidates=self.auto_candidates,
                                                     choices_file=self.auto_choices_file, any_canvas=self.any_canvas)
            self._set_mode(self.auto_choice.chosen)
            return engine
        return build_runner(self.accelerate, self.engine_network, self.normalize, example_uint8, self.info.strides,
                            calibration=self.calibration, any_canvas=self.any_canvas)

    def _set_mode(self, mode: str) -> None:
        self.accelerate = mode
        self.info = replace(self.info, accelerate=mode)

    def set_engine(self, engine, name: str) -> None:
        """Run the network with `engine` (uint8 batch -> raw outputs of `engine_network`), e.g. one built
        elsewhere."""
        self._engine = engine
        self._set_mode(name)

    @torch.inference_mode()
    def forward(self, batch_uint8: torch.Tensor) -> HeadOutputs | SparseHeadOutputs:
        if self.accelerate == "cudagraph":
            batch_uint8 = batch_uint8.to(self.device, non_blocking=True)
        if self._engine is None:
            self._engine = self._build(batch_uint8)
        cls, second = self._engine(batch_uint8)
        if self.regressor is not None:
            return SparseHeadOutputs(list(cls), list(second), self.regressor)
        return HeadOutputs(list(cls), list(second))

    @property
    def overlapping_calls(self) -> bool:
        """Whether `forward` may run two batches at once from two threads, to gain from it: an engine over torch
        streams (model.inference.streams), once built (the build itself is not for two threads)."""
        return bool(getattr(self._engine, "overlapping_calls", False))

    def warmup(self, batch_sizes: Sequence[int], input_size: int) -> None:
        """Each batch size once (more where the engine asks: TorchScript profiles shapes over two calls); on CUDA
        the sizes become the graph buckets; with `auto`, the engines are measured at the smallest and the largest
        size, and each batch runs on the winner of the nearer one."""
        if self.accelerate == "cudagraph":
            if self._engine is None:
                self._engine = self._build(None)
            self._engine.buckets = sorted(set(batch_sizes))
        if self.accelerate == "auto" and self._engine is None and batch_sizes:
            sizes = sorted({min(batch_sizes), max(batch_sizes)})
            with torch.inference_mode():
                self._engine = self._build(None, [blank_batch(b, input_size) for b in sizes])
        for b in batch_sizes:
            batch = blank_batch(b, input_size)
            self.forward(batch)
            for _ in range(getattr(self._engine, "warmup_calls", 1) - 1):
                self.forward(batch)

    def is_ready(self) -> bool:
        return True

    def close(self) -> None:
        close = getattr(self._engine, "close", None)  # streams' worker threads (model.inference.streams)
        if close is not None:
            close()
        self._engine = None
        self.network = None
