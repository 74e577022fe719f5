"""ONNX Runtime and OpenVINO as runners: the same uint8 batch in, the same raw head outputs out.

The graph is `model.export`'s `heads` layout (normalisation inside, a dynamic batch axis), exported from the
Detector's own (BatchNorm-folded, float32) network at start-up, so the runner computes exactly what the
torch runners do. Both runtimes are told the thread count, so a comparison with torch is at equal threads.

OpenVINO: its CPU plugin runs in bfloat16 by default on CPUs with AVX512-BF16/AMX (this one has it), which
is ~1.7x faster here but 5e-3 of the peak off float32; `INFERENCE_PRECISION_HINT=f32` keeps it exact (within
1e-6 of the peak, as ONNX Runtime). Each batch size is compiled once for its static shape (~0.5 s for tiny)
on first use: static shapes let the plugin pick its kernels ahead.

Streams (both runtimes): with `threads` >= 2, a batch with at least one image per stream (by default one stream
per thread) is cut into a chunk per stream, run at once, each stream on its share of the cores (ONNX Runtime: one
session of `threads // streams` threads per stream; OpenVINO: NUM_STREAMS, its own way of doing the same), while
a smaller batch, a batch of one included, runs whole on one session with all the threads (`filled_stream_slices`:
a session's thread count is fixed, so streams short of images would leave cores idle). Cores that share no
image need not wait for each other after every layer, as one image's intra-op threads must (measured in
`bench/bench_runners.py`, which also times each runtime on one session, as a plain user runs it). Each stream
keeps its own copy of the weights (ONNX Runtime: `streams` + 1 sessions).
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.export import INPUT_NAME, ExportableRTMDet, example_batch, head_output_names, write_onnx
from model.inference.accelerate import Outputs
from model.inference.streams import STREAM_TIMEOUT_S, filled_stream_slices, stream_count


@contextlib.contextmanager
def export_network(net: nn.Module, strides: Sequence[int], input_size: int,
                   any_canvas: bool = False) -> Iterator[Path]:
    """The inference network (already fused) as a `heads`-layout ONNX file with a dynamic batch, in a temporary
    folder that is removed on leaving (the runtimes have read it by then). `any_canvas`: a symbolic height and
    width too (any multiples of the largest stride: the `tight` canvas); the export then takes ~2.5 s longer for
    tiny here (8-9 s against 5-7 s), so the square canvas does not pay for it."""
    module = ExportableRTMDet(copy.deepcopy(net).float().to(memory_format=torch.contiguous_format),
                              strides).eval()
    with tempfile.TemporaryDirectory(prefix="rtmdet-runner-") as tmp:
        path = Path(tmp) / "network.onnx"
        write_onnx(module, example_batch(2, input_size, 0), path, head_output_names(strides), dynamic_batch=True,
                   dynamic_canvas=any_canvas)
        yield path


def split_heads(arrays: Sequence[np.ndarray]) -> Outputs:
    """The graph's outputs (cls per level, then reg per level) as the network's two lists of tensors."""
    tensors = [torch.from_numpy(a) for a in arrays]
    half = len(tensors) // 2
    return tensors[:half], tensors[half:]


def concat_heads(parts: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Each output's chunks joined along the batch axis, in chunk order."""
    return [np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0] for arrays in zip(*parts, strict=True)]


class OnnxRuntimeRunner:
    """onnxruntime CPU sessions; `run` is thread-safe, so the sessions serve every caller. `streams` (default:
    `threads`) sessions of `threads // streams` threads run the chunks of a batch that fills them at once; one
    `threads`-threaded session runs a smaller batch (or every batch, with `streams=1`: what a plain ONNX Runtime
    user gets)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int, streams: int | None = None) -> None:
        self.streams = stream_count(threads, streams)
        self.session = self._session(path, threads)
        share = threads // self.streams
        self.stream_sessions = [self._session(path, share) for _ in range(self.streams)] if self.streams > 1 else []
        self.pool = (ThreadPoolExecutor(self.streams, thread_name_prefix="ort-stream") if self.stream_sessions
                     else None)

    @staticmethod
    def _session(path: str | Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1  # one graph at a time: parallelism is inside each operator
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's own thread pool spins between operators by default; follow the process's OpenMP wait
        # policy instead, so that with OMP_WAIT_POLICY=PASSIVE (what the tests and a shared machine use) it
        # waits as passively as torch's threads do.
        spin = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        x = batch_uint8.cpu().numpy()
        chunks = filled_stream_slices(len(x), self.streams)
        if len(chunks) == 1:
            return split_heads(self.session.run(None, {INPUT_NAME: x}))
        futures = [self.pool.submit(session.run, None, {INPUT_NAME: x[chunk]})
                   for session, chunk in zip(self.stream_sessions, chunks, strict=True)]
        return split_heads(concat_heads([f.result(timeout=STREAM_TIMEOUT_S) for f in futures]))


_CORE_LOCK = threading.Lock()
_CORE: list = []  # the process's one openvino.Core, made on first use


def openvino_core():
    """The process's one OpenVINO Core, never destroyed.

    Why one: a Core's CPU plugin, loaded by its first compile (or CPU property query), gives the thread that loads it
    a signal stack of its own (`sigaltstack`). When that plugin is destroyed, it frees that stack and restores
    whatever stack it had replaced, on whichever thread destroys it. With a Core per runner, runners freed in any
    order but the reverse of their creation, or on another thread, left a thread whose signal stack was freed
    memory. The next signal delivered there to a handler that runs on that stack (Python's handlers all do:
    SIGTERM, SIGCHLD, ...) killed the process with SIGSEGV. The test suite did this: a pytest process died when
    a child exited after two OpenVINO runners had gone. With one Core the plugin is loaded once and its stack
    lives as long as the process."""
    with _CORE_LOCK:
        if not _CORE:
            import openvino as ov

            _CORE.append(ov.Core())
        return _CORE[0]


class OpenVINORunner:
    """OpenVINO's CPU plugin, float32, one compiled model per chunk shape; infer requests per thread (a request
    runs one inference at a time, and the service's watchdog may start a new batcher thread while an old one is
    still inside a call). A batch with an image for each of `streams` (default: `threads`) streams is cut into
    that many chunks run at once on NUM_STREAMS streams (`threads // streams` threads each); a smaller batch runs
    whole on all the threads (PERFORMANCE_HINT=LATENCY)."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int, streams: int | None = None) -> None:
        self.core = openvino_core()
        self.model = self.core.read_model(str(path))
        self.streams = stream_count(threads, streams)
        self.configs = {
            "latency": {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_PRECISION_HINT": "f32"},
            "streams": {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": self.streams,
                        "INFERENCE_PRECISION_HINT": "f32"},
        }
        self.compiled: dict[tuple, object] = {}
        self.lock = threading.Lock()  # held only to compile a new shape, never around an inference
        self.local = threading.local()

    def _compiled_for(self, mode: str, shape: tuple[int, ...]):
        with self.lock:
            if (mode, shape) not in self.compiled:
                model = self.model.clone()
                model.reshape({INPUT_NAME: list(shape)})
                self.compiled[mode, shape] = self.core.compile_model(model, "CPU", self.configs[mode])
            return self.compiled[mode, shape]

    def _request(self, mode: str, shape: tuple[int, ...], index: int):
        requests = self.local.__dict__.setdefault("requests", {})
        key = (mode, shape, index)
        if key not in requests:
            requests[key] = self._compiled_for(mode, shape).create_infer_request()
        return requests[key]

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        x = batch_uint8.cpu().numpy()
        chunks = filled_stream_slices(len(x), self.streams)
        mode = "latency" if len(chunks) == 1 else "streams"
        started = []
        for i, chunk in enumerate(chunks):
            request = self._request(mode, (chunk.stop - chunk.start, *x.shape[1:]), i)
            request.start_async({0: x[chunk]})
            started.append(request)
        for request in started:
            if not request.wait_for(int(STREAM_TIMEOUT_S * 1000)):
                raise TimeoutError(f"OpenVINO inference took over {STREAM_TIMEOUT_S:g} s")
        # Copies: a request's output buffers are overwritten by its next inference.
        return split_heads(concat_heads([[np.array(r.get_output_tensor(i).data, copy=True)
                                          for i in range(len(r.model_outputs))] for r in started]))


def build_onnx_runner(mode: str, path: str | Path, threads: int, streams: int | None = None):
    if mode == "onnxruntime":
        return OnnxRuntimeRunner(path, threads, streams)
    if mode == "openvino":
        return OpenVINORunner(path, threads, streams)
    raise ValueError(f"no ONNX runner {mode!r}")
