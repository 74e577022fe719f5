"""What runners of exported networks (ONNX Runtime, Triton) share: reading the file's `rtmdet.*` metadata
(written by `model.export`) and naming the head outputs `cls_s8 .. reg_s32`."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from model.classes import COCO_CLASSES
from model.config import STRIDES
from model.inference.runner import HeadOutputs, NetworkInfo


def network_info(meta: Mapping[str, str], backend: str, device: str, input_size: int | None, fixed: bool,
                 class_names: Sequence[str] | None = None, weights_sha256: str | None = None) -> NetworkInfo:
    """What an exported file's `rtmdet.*` metadata (ONNX metadata or Triton parameters) says."""
    names = class_names or json.loads(meta.get("rtmdet.classes", "null")) or COCO_CLASSES
    size = int(meta["rtmdet.input_size"]) if "rtmdet.input_size" in meta else input_size
    return NetworkInfo(size=meta.get("rtmdet.size", "unknown"), class_names=tuple(names), backend=backend,
                       device=device, dtype=meta.get("rtmdet.dtype", "float32"),
                       strides=tuple(json.loads(meta.get("rtmdet.strides", json.dumps(STRIDES)))),
                       input_size=input_size if fixed else size, fixed_input_size=fixed,
                       weights_sha256=meta.get("rtmdet.weights_sha256") or weights_sha256)


def head_outputs(outs: Mapping[str, np.ndarray], strides: Sequence[int]) -> HeadOutputs:
    return HeadOutputs([torch.from_numpy(outs[f"cls_s{s}"]) for s in strides],
                       [torch.from_numpy(outs[f"reg_s{s}"]) for s in strides])
