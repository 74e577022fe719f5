"""Runners: the network behind one call signature, `runner(batch_uint8) -> (cls_scores, bbox_preds)`.

A runner takes the letterboxed uint8 BGR batch (B, S, S, 3) that `Detector.preprocess` makes and returns
the raw head outputs (per level, logits (B, C, H, W) and ltrb distances (B, 4, H, W), float32 or the
Detector's dtype), so the Detector's pre- and post-processing are shared by every runner. Normalisation is
the runner's: in PyTorch for the torch runners, inside the graph for the ONNX ones.

CPU modes (RTMDet-tiny, 640x640, 1 thread, this 2-core machine quiet, glibc keeping freed memory; ms per
image at batch 1, `bench/bench_runners.py`, 2026-12-01): eager ~94, inductor ~76, ONNX Runtime ~73, OpenVINO
~74 (the README's table has every size, batch and thread count). All give the eager outputs within 1e-6 of
their peak.

- `eager`: the module itself (channels_last, BatchNorm folded). No start-up cost: the default on the CPU.
  With 2+ threads, eager and inductor cut a batch of 2+ over one-thread streams (model.inference.streams).
  On the CPU both run the stride-1 3x3 convolutions of 24+ channels as Winograd F(4x4, 3x3) (model.inference.winograd;
  `RTMDET_WINOGRAD=0` turns it off); the eager reference that `auto` checks candidates against does not.
  Eager also runs its 1x1 convolutions, where torch would take its native NCHW path (one thread, a batch under 16:
  every one-thread stream), as one matrix product over NHWC rows (model.inference.pointwise).
- `inductor`: `torch.compile` with freezing (weights folded into the graph as constants, convolutions packed
  for oneDNN with their activations fused).
  Compiles on the first call of a shape (~5-20 s for tiny here; a second batch size compiles once more,
  with a symbolic batch axis, and then covers every batch size).
- `onnxruntime` / `openvino` (model.inference.onnx_runners): the network exported to ONNX once at start-up
  (~10 s for tiny here) and run by that runtime, a batch cut over one stream per thread; opt-in or chosen by
  `auto`.
- `torchscript` (old name `onednn`, opt-in only): trace + freeze with oneDNN Graph fusion. TorchScript is
  deprecated in torch 2.14; kept because it is still faster than eager, though not than inductor.
- `cudagraph` (CUDA, the default there): one captured CUDA graph per batch size; a batch is padded up to
  the smallest captured size that holds it, so the batcher's sizes (1, 2, 4, ..., max) cover every batch.
- `auto`: on the CPU, measures the candidates on this machine at start-up, at the smallest and the largest
  warm-up batch, and runs each batch on the fastest (at the nearer size) whose outputs match eager's
  (model.inference.runner_choice); on CUDA, `cudagraph`.
- `openvino-bf16` / `openvino-int8` (model.inference.low_precision): reduced precision, by name only (never an
  `auto` candidate); int8 needs calibration images.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from model.inference.modes import ALIASES, CPU_MODES, LOW_PRECISION_MODES, MODES
from model.inference.pointwise import with_pointwise_gemm
from model.inference.streams import with_streams
from model.inference.winograd import with_winograd

Outputs = tuple[list[torch.Tensor], list[torch.Tensor]]
Runner = Callable[[torch.Tensor], Outputs]  # uint8 (B, S, S, 3) -> raw head outputs


def resolve_mode(mode: str | None, device: torch.device) -> str:
    """The mode to run: None is the device's default (`eager` on the CPU, `cudagraph` on CUDA); `auto` stays
    `auto` on the CPU (measured when the first batch arrives) and is `cudagraph` on CUDA."""
    mode = ALIASES.get(mode, mode)
    if mode is None:
        return "cudagraph" if device.type == "cuda" else "eager"
    if mode not in MODES:
        raise ValueError(f"unknown accelerate mode {mode!r}; one of {MODES}")
    if mode == "auto":
        return "cudagraph" if device.type == "cuda" else "auto"
    if mode in CPU_MODES and mode != "eager" and device.type != "cpu":
        raise ValueError(f"the {mode} runner is for the CPU")
    if mode == "cudagraph" and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    return mode


def on_cpu(net: nn.Module) -> bool:
    return next(net.parameters()).device.type == "cpu"


def fast_eager(reference: EagerRunner) -> EagerRunner:
    """The eager runner as `build_runner` makes it (Winograd and GEMM 1x1s on the CPU), from the reference eager
    runner."""
    return EagerRunner(reference.net, reference.normalize, fast=True)


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `batch` (the batch itself when none does)."""
    fitting = [b for b in buckets if b >= batch]
    return min(fitting) if fitting else batch


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last image until the batch has `size` images (a real image: no special values)."""
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])


def trim_outputs(out: Outputs, batch: int) -> Outputs:
    cls, reg = out
    return [c[:batch] for c in cls], [r[:batch] for r in reg]


class EagerRunner:
    """The module itself, after `normalize`. With `fast` (on the CPU; `build_runner` asks for it, the reference that
    other runners are checked against does not), a copy of the network runs its wide 3x3 convolutions as Winograd
    F(4x4, 3x3) (model.inference.winograd) and its 1x1 convolutions, where torch would run them natively, as one
    matrix product over NHWC rows (model.inference.pointwise)."""

    name = "eager"

    def __init__(self, net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                 fast: bool = False) -> None:
        self.net, self.winograd_convs, self.pointwise_convs = net, 0, 0
        if fast and on_cpu(net):
            self.net, self.winograd_convs = with_winograd(net)
            # with_winograd copied the network unless it was off: swap the 1x1s in that copy, never in `net`.
            self.net, self.pointwise_convs = with_pointwise_gemm(self.net, inplace=self.net is not net)
        self.normalize = normalize

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        with torch.inference_mode():
            cls, reg = self.net(self.normalize(batch_uint8))
        return list(cls), list(reg)


class InductorRunner:
    """`torch.compile` (inductor) of normalise + network, weights frozen into the graph.

    On the CPU (`winograd`, default: when the network is on the CPU) the stride-1 3x3 convolutions of 24+
    channels are swapped for Winograd F(4x4, 3x3) in a copy of the network (model.inference.winograd): 4x fewer
    multiply-adds, each convolution (with its SiLU) one fused C kernel, a custom op that inductor calls.

    Freezing is what makes inductor fast on the CPU: with the weights as constants it packs every convolution
    for oneDNN once and fuses its bias, SiLU and residual add into it (`mkldnn::_convolution_pointwise`);
    without it each call runs plain `aten.convolution`, re-laying out the weights (RTMDet-tiny, 640, 1 thread:
    ~77 ms against ~101 ms). `torch.compile(options={"freezing": True})` does *not* freeze: inductor reads
    `config.freezing` before the options are applied, so the flag is patched around each call instead (a
    compile, first call of a shape, happens inside one). Freezing needs the calls to run without autograd
    (`torch.no_grad`)."""

    name = "inductor"

    def __init__(self, net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                 options: dict | None = None, winograd: bool | None = None) -> None:
        # cuDNN picks its own convolution algorithms on CUDA.
        use = winograd if winograd is not None else on_cpu(net)
        self.net, self.winograd_convs = with_winograd(net, compiled=True) if use else (net, 0)
        self.normalize = normalize
        self.compiled = torch.compile(self._forward, options=options)

    def _forward(self, batch_uint8: torch.Tensor):
        return self.net(self.normalize(batch_uint8))

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        from torch._inductor import config as inductor_config

        # no_grad, not inference_mode: inductor's freezing pass wants parameters it may fold, and
        # inference-mode tensors cannot be saved for its graph.
        with torch.inference_mode(False), torch.no_grad(), inductor_config.patch(freezing=True):
            cls, reg = self.compiled(batch_uint8.clone() if batch_uint8.is_inference() else batch_uint8)
        return list(cls), list(reg)


class TorchScriptRunner:
    """TorchScript (trace + freeze) with oneDNN Graph fusion; CPU only. Deprecated API: opt-in only.

    TorchScript's profiling executor specialises per input shape: the first two calls of a new shape are
    slow, so warm up every batch size twice."""

    name = "torchscript"
    warmup_calls = 2

    def __init__(self, net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                 example_uint8: torch.Tensor) -> None:
        self.normalize = normalize
        torch.jit.enable_onednn_fusion(True)  # process-wide flag; only TorchScript graphs look at it
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about the Python loops over levels; deprecation
            self.module = torch.jit.freeze(torch.jit.trace(copy.deepcopy(net).eval(), normalize(example_uint8)))

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        with torch.no_grad():
            cls, reg = self.module(self.normalize(batch_uint8))
        return list(cls), list(reg)


class CudaGraphRunner:
    """One CUDA graph per (bucketed) input shape, captured on first use; inputs copied into static buffers."""

    name = "cudagraph"

    def __init__(self, net: Callable[[torch.Tensor], Outputs], buckets: Sequence[int] = ()) -> None:
        self.net = net
        self.buckets = sorted(set(buckets))
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]] = {}
        self.pool = None

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # cuDNN autotuning and lazy allocations happen outside the capture
                self.net(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            static_out = self.net(static_in)
        self.pool = graph.pool()  # every graph shares one memory pool: they never run at the same time
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> Outputs:
        batch = x.shape[0]
        x = pad_batch(x, bucket_for(batch, self.buckets))
        key = (tuple(x.shape), x.dtype, x.stride())
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        cls, reg = static_out
        # Clones: the next replay overwrites the static outputs while a caller may still hold these.
        return [c[:batch].clone() for c in cls], [r[:batch].clone() for r in reg]


def build_runner(mode: str, net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                 example_uint8: torch.Tensor, strides: Sequence[int], threads: int | None = None,
                 calibration=None, any_canvas: bool = False) -> Runner:
    """The runner for a resolved, non-`auto` mode. `example_uint8` is a batch of the serving shape (traced by
    TorchScript, exported for the ONNX runtimes); `threads` (default: torch's) for the ONNX runtimes and the
    CPU's eager and inductor streams (model.inference.streams: a batch cut over one-thread streams);
    `calibration` (model.inference.low_precision.Calibration) for `openvino-int8`; `any_canvas`: the runtimes'
    export takes any height and width (the `tight` canvas), not only `example_uint8`'s square."""
    if mode in ("eager", "inductor"):
        engine = EagerRunner(net, normalize, fast=True) if mode == "eager" else InductorRunner(net, normalize)
        if on_cpu(net):
            return with_streams(engine, threads or torch.get_num_threads())
        return engine
    if mode == "torchscript":
        return TorchScriptRunner(net, normalize, example_uint8)
    if mode == "cudagraph":
        return CudaGraphRunner(lambda u8: net(normalize(u8)))
    if mode in ("onnxruntime", "openvino"):
        from model.inference.onnx_runners import build_onnx_runner, export_network

        with export_network(net, strides, int(example_uint8.shape[1]), any_canvas) as path:
            return build_onnx_runner(mode, path, threads or torch.get_num_threads())
    if mode in LOW_PRECISION_MODES:
        from model.inference.low_precision import build_low_precision_runner
        from model.inference.onnx_runners import export_network

        with export_network(net, strides, int(example_uint8.shape[1]), any_canvas) as path:
            return build_low_precision_runner(mode, path, threads or torch.get_num_threads(),
                                              int(example_uint8.shape[1]), calibration)
    raise ValueError(f"no runner for mode {mode!r}")
