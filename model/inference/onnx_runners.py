"""ONNX Runtime and OpenVINO as runners: the same uint8 batch in, the same raw head outputs out.

The graph is `model.export`'s `heads` layout (normalisation inside, a dynamic batch axis), exported from the
Detector's own (BatchNorm-folded, float32) network at start-up, so the runner computes exactly what the
torch runners do. Both runtimes are told the thread count, so a comparison with torch is at equal threads.

OpenVINO: its CPU plugin runs in bfloat16 by default on CPUs with AVX512-BF16/AMX (this one has it), which
is ~1.7x faster here but 5e-3 of the peak off float32; `INFERENCE_PRECISION_HINT=f32` keeps it exact (within
1e-6 of the peak, as ONNX Runtime). Each batch size is compiled once for its static shape (~0.5 s for tiny)
on first use: static shapes let the plugin pick its kernels ahead.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.export import INPUT_NAME, ExportableRTMDet, example_batch, head_output_names, write_onnx
from model.inference.accelerate import Outputs


@contextlib.contextmanager
def export_network(net: nn.Module, strides: Sequence[int], input_size: int) -> Iterator[Path]:
    """The inference network (already fused) as a `heads`-layout ONNX file with a dynamic batch, in a
    temporary folder that is removed on leaving (the runtimes have read it by then)."""
    module = ExportableRTMDet(copy.deepcopy(net).float().to(memory_format=torch.contiguous_format),
                              strides).eval()
    with tempfile.TemporaryDirectory(prefix="rtmdet-runner-") as tmp:
        path = Path(tmp) / "network.onnx"
        write_onnx(module, example_batch(2, input_size, 0), path, head_output_names(strides), dynamic_batch=True)
        yield path


def split_heads(arrays: Sequence[np.ndarray]) -> Outputs:
    """The graph's outputs (cls per level, then reg per level) as the network's two lists of tensors."""
    tensors = [torch.from_numpy(a) for a in arrays]
    half = len(tensors) // 2
    return tensors[:half], tensors[half:]


class OnnxRuntimeRunner:
    """An onnxruntime CPU session; `run` is thread-safe, so one session serves every caller."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int) -> None:
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
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        return split_heads(self.session.run(None, {INPUT_NAME: batch_uint8.cpu().numpy()}))


class OpenVINORunner:
    """OpenVINO's CPU plugin, float32, one compiled model per batch size; infer requests per thread (a
    request runs one inference at a time, and the service's watchdog may start a new batcher thread while
    an old one is still inside a call)."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled: dict[tuple[int, ...], object] = {}
        self.lock = threading.Lock()  # held only to compile a new shape, never around an inference
        self.local = threading.local()

    def _compiled_for(self, shape: tuple[int, ...]):
        with self.lock:
            if shape not in self.compiled:
                model = self.model.clone()
                model.reshape({INPUT_NAME: list(shape)})
                self.compiled[shape] = self.core.compile_model(model, "CPU", self.config)
            return self.compiled[shape]

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        x = batch_uint8.cpu().numpy()
        shape = tuple(x.shape)
        requests = self.local.__dict__.setdefault("requests", {})
        if shape not in requests:
            requests[shape] = self._compiled_for(shape).create_infer_request()
        request = requests[shape]
        request.infer({0: x})
        # Copies: the request's output buffers are overwritten by its next inference.
        return split_heads([np.array(request.get_output_tensor(i).data, copy=True)
                            for i in range(len(request.model_outputs))])


def build_onnx_runner(mode: str, path: str | Path, threads: int):
    if mode == "onnxruntime":
        return OnnxRuntimeRunner(path, threads)
    if mode == "openvino":
        return OpenVINORunner(path, threads)
    raise ValueError(f"no ONNX runner {mode!r}")
