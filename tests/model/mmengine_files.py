"""Training checkpoints laid out and pickled as MMDetection 3.3.0's Runner writes them, built without mmengine.

`write_mmengine_checkpoint` registers stand-in modules under mmengine's and numpy 1's names only while it
saves, so the file's pickle names `mmengine.logging.history_buffer.HistoryBuffer`, `builtins.getattr` (for
`HistoryBuffer.min` ...), `numpy.core.multiarray._reconstruct`/`scalar`, `numpy.ndarray` and `numpy.dtype`
exactly as a real one does (checked against a file written by mmengine 0.10.7's Runner with EMAHook: the same
six globals). When loading, none of these modules exists: the reader sees classes it does not know.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections import OrderedDict

import numpy as np
import torch

HISTORY_BUFFER_MODULE = "mmengine.logging.history_buffer"


class HistoryBuffer:
    """Pickles like mmengine's: `max_length`, two numpy arrays and `statistics_methods` (class functions)."""

    calls: list[str] = []  # what ran: a reader must never construct or call this class

    def __init__(self, values=(), max_length=1000000) -> None:
        HistoryBuffer.calls.append("__init__")
        self.max_length = max_length
        self._log_history = NumpyOneArray(np.asarray(values, dtype=np.float64))
        self._count_history = NumpyOneArray(np.ones(len(values), dtype=np.int64))
        self.statistics_methods = {"min": HistoryBuffer.min, "mean": HistoryBuffer.mean}

    def __setstate__(self, state) -> None:
        HistoryBuffer.calls.append("__setstate__")
        self.__dict__.update(state)

    def min(self):
        HistoryBuffer.calls.append("min")

    def mean(self):
        HistoryBuffer.calls.append("mean")


for _f in (HistoryBuffer, HistoryBuffer.min, HistoryBuffer.mean):
    _f.__module__ = HISTORY_BUFFER_MODULE


def _reconstruct(*args):  # the stand-in for numpy 1's numpy.core.multiarray._reconstruct (only named, never run)
    raise AssertionError("numpy's _reconstruct must not be called by the reader")


def _scalar(*args):
    raise AssertionError("numpy's scalar must not be called by the reader")


_reconstruct.__module__ = _scalar.__module__ = "numpy.core.multiarray"
_reconstruct.__qualname__, _scalar.__qualname__ = "_reconstruct", "scalar"


class NumpyOneArray:
    """Pickles as numpy 1.x pickles an ndarray: `_reconstruct(ndarray, (0,), b'b')` + BUILD with its state."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.ascontiguousarray(array)

    def __reduce__(self):
        a = self.array
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, a.shape, a.dtype, False, a.tobytes())


class NumpyOneScalar:
    """Pickles as numpy 1.x pickles a scalar: `numpy.core.multiarray.scalar(dtype, raw bytes)`."""

    def __init__(self, value) -> None:
        self.value = value

    def __reduce__(self):
        return _scalar, (self.value.dtype, self.value.tobytes())


@contextlib.contextmanager
def fake_modules(contents: dict[str, dict[str, object]]):
    """`sys.modules[name]` = a module holding `contents[name]` (and empty parents) for the duration."""
    saved = {}
    names = set(contents)
    for name in list(contents):
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name in sorted(names):
        if name in sys.modules and name not in contents:
            continue  # a real parent package (numpy, numpy.core) stays
        saved[name] = sys.modules.get(name)
        module = types.ModuleType(name)
        for key, value in contents.get(name, {}).items():
            setattr(module, key, value)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_mmengine_checkpoint(path, ema: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                              classes: tuple[str, ...], extra: dict | None = None) -> None:
    """What mmengine's Runner + EMAHook save: `state_dict` = the EMA weights, `ema_state_dict` = the raw
    ones as `module.<key>` plus `steps`, and meta/message_hub/optimizer/param_schedulers with mmengine and
    numpy objects in them."""
    ckpt = {
        "meta": {"epoch": 60, "iter": 1200, "cfg": "model = dict(type='RTMDet')\n", "seed": 0,
                 "experiment_name": "rtmdet_tiny", "mmengine_version": "0.10.7",
                 "dataset_meta": {"classes": classes, "palette": [(220, 20, 60)] * len(classes)},
                 "best_coco_bbox_mAP": NumpyOneScalar(np.float64(0.25))},
        "state_dict": OrderedDict(ema),
        "message_hub": {"log_scalars": OrderedDict({"train/loss": HistoryBuffer([1.5, 1.25]),
                                                    "train/lr": HistoryBuffer([0.004])}),
                        "runtime_info": OrderedDict({"epoch": 60, "iter": 1200,
                                                     "coco/bbox_mAP": NumpyOneScalar(np.float32(0.5)),
                                                     "class_counts": NumpyOneArray(np.arange(6).reshape(2, 3))}),
                        "resumed_keys": OrderedDict({"epoch": False})},
        "optimizer": {"state": {0: {"step": torch.tensor(1200.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.004, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]},
        "param_schedulers": [{"start_factor": 1e-05, "last_step": 1200, "base_values": [0.004], "_global_step": 1200}],
        "ema_state_dict": OrderedDict({"steps": torch.tensor(1200)} | {f"module.{k}": v for k, v in raw.items()}),
        **(extra or {}),
    }
    HistoryBuffer.calls.clear()
    with fake_modules({HISTORY_BUFFER_MODULE: {"HistoryBuffer": HistoryBuffer},
                       "numpy.core.multiarray": {"_reconstruct": _reconstruct, "scalar": _scalar}}):
        torch.save(ckpt, path)
    HistoryBuffer.calls.clear()
