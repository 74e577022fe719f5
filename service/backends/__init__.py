"""Runner factories: a `ModelSpec` in, a `model.inference.runner.Runner` out.

The whole pre- and post-processing is `model.inference`'s (a `Detector` is that transform plus a runner);
what differs between engines is only how the uint8 batch becomes raw outputs:

- `torch` (`service.backends.torch`): the RTMDet module in-process (eager, oneDNN or CUDA graphs).
- `onnx` (`service.backends.onnx`): an exported `.onnx` file on ONNX Runtime.
- `triton` (`service.backends.triton`): a model on NVIDIA Triton Inference Server, over gRPC.

Each module is imported only when its backend is asked for, so the CPU image needs neither ONNX Runtime
nor `tritonclient` unless it serves them. Every factory raises `BackendUnavailable` with a message that
names the file or server and the problem.
"""
from __future__ import annotations

import importlib

from model.inference.runner import Runner
from service.errors import BackendUnavailable
from service.settings import BACKENDS, ModelSpec

__all__ = ["BACKENDS", "BackendUnavailable", "Runner", "create_runner"]


def create_runner(spec: ModelSpec) -> Runner:
    """The runner for `spec.backend`; each module exposes `build(spec) -> Runner`."""
    if spec.backend not in BACKENDS:
        raise BackendUnavailable(f"backend {spec.backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"service.backends.{spec.backend}")
    return module.build(spec)
