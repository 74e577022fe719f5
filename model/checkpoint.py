"""Official-format checkpoints: load strictly without unpickling code, save in the same layout.

An MMDetection checkpoint is `{'meta': {...}, 'state_dict': {...}}`; training ones add
`ema_state_dict`, `optimizer` and `message_hub`. `.safetensors` files hold a bare state dict, with
the class names (if any) in the header metadata.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the problem."""


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) from a `.pth`/`.pt` (weights_only) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                header = f.metadata() or {}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        meta = json.loads(header["meta"]) if "meta" in header else {}
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    return state, dict(meta)


def class_names_from_meta(meta: Mapping) -> list[str] | None:
    """Class names as MMDetection 3 (`dataset_meta.classes`) or 2 (`CLASSES`) store them."""
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    names = names or meta.get("CLASSES") or meta.get("classes")
    return [str(n) for n in names] if names else None


def _describe(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_describe(mismatched, 3)}")
    if problems:
        hint = ""
        size = getattr(module, "size", None)
        if mismatched and size:
            hint = f" (is it really an RTMDet-{size} checkpoint with {getattr(module, 'num_classes', '?')} classes?)"
        raise CheckpointError(f"{source}: does not fit the model{hint}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_checkpoint(module: nn.Module, path: str | os.PathLike) -> dict:
    """Load an official-format or bare checkpoint strictly into `module`; returns the file's meta."""
    state, meta = read_checkpoint(path)
    load_state_dict_strict(module, state, source=str(path))
    return meta


def infer_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    w = state.get("bbox_head.rtm_cls.0.weight")
    return int(w.shape[0]) if w is not None else None


def standard_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` on the CPU in the contiguous (NCHW) layout of the official checkpoints, keeping aliases shared:
    the head's convs shared across levels stay one tensor under several keys, as in the model."""
    by_storage: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
        if key not in by_storage:
            by_storage[key] = v.detach().cpu().contiguous()
        out[k] = by_storage[key]
    return out


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], meta: Mapping | None = None,
                    **extra) -> None:
    """Write `{'meta', 'state_dict', **extra}` atomically: a crash never leaves a half-written file. The weights
    go in the official contiguous layout whatever memory format the model runs in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": dict(meta or {}), "state_dict": standard_layout(state_dict), **extra}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        # safetensors refuses aliased storage; the head's shared convs are aliases, so copy.
        tensors = {k: v.contiguous().clone() for k, v in payload["state_dict"].items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"meta": json.dumps(payload["meta"])})
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
    os.replace(tmp, path)


def make_meta(class_names: Sequence[str] | None = None, **info) -> dict:
    meta: dict = dict(info)
    if class_names is not None:
        meta["dataset_meta"] = {"classes": tuple(class_names)}
    return meta
