"""Official-format checkpoints: load strictly without unpickling code, save in the same layout.

An MMDetection checkpoint is `{'meta': {...}, 'state_dict': {...}}` (the published form). Training ones, as
mmengine's Runner writes them, add `message_hub`, `optimizer`, `param_schedulers` and, with `EMAHook` (every
RTMDet config), `ema_state_dict`. The hook swaps the two sets when it saves: `state_dict` holds the EMA weights
(the ones MMDetection evaluates and publishes) and `ema_state_dict` the raw training weights, keys prefixed
`module.`, plus a `steps` counter. Our Trainer writes the same layout. `weights_key` picks a set: "ema" (the
default: `state_dict`, which is the only set in a file trained without EMA) or "raw" (`ema_state_dict`).
Training files hold mmengine and numpy objects that `weights_only=True` refuses; `model.foreign_pickle` reads
those as data. `.safetensors` files hold a bare state dict, with the class names (if any) in the header metadata.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from model.config import WEIGHTS_KEYS
from model.errors import CheckpointError

_PREFIXES = ("module.", "model.")  # wrappers (DDP, EMA, Lightning-style) around the detector's own keys
# What torch's weights-only unpickler (and ours inside it) says when it stops a pickle from calling something.
_REFUSALS = ("is not allowed", "unrecognized function", "Can only", "Unsupported global")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_bytes(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """One line for a file torch cannot open, without torch's advice (ANSI-coloured, about unsafe loading)."""
    if isinstance(exc, EOFError):
        reason = "the file is empty or cut short"
    elif not _first_bytes(path, 4).startswith((b"PK\x03\x04", b"\x80\x02")):  # zip, or torch's legacy pickle
        reason = "not a PyTorch file (a .pth zip archive) nor .safetensors"
    else:
        text = _ANSI.sub("", str(exc)).strip()
        marker = "WeightsUnpickler error:"
        text = text[text.index(marker) + len(marker):] if marker in text else text
        reason = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(exc).__name__
    return CheckpointError(f"{path}: not a readable checkpoint ({reason[:300]})")


def _load_pickled(path: Path):
    """torch's `weights_only=True` load; if that refuses the file only for its mmengine/numpy objects, the same
    unpickler with data-only stand-ins for them (`model.foreign_pickle`). Code in a pickle is never run."""
    from model.foreign_pickle import ForeignPickleError, foreign_globals, load_foreign

    with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says what matters
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = exc
        try:
            names = foreign_globals(path) if zipfile.is_zipfile(path) else []
        except Exception:
            names = []
        if not names:
            raise _unreadable(path, first) from None
        try:
            return load_foreign(path, names)
        except ForeignPickleError as exc:
            raise CheckpointError(f"{path}: refused: {exc}") from None
        except Exception as exc:
            error = _unreadable(path, exc)
            if any(w in str(error) for w in _REFUSALS):  # the unpickler stopped a call or a build
                error = CheckpointError(str(error).replace("not a readable checkpoint (", "refused (", 1))
            raise error from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return _strip_prefixes({k[len(prefix):]: v for k, v in state.items()})
    return state


def read_checkpoint(path: str | os.PathLike, weights_key: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) from a `.pth`/`.pt` or `.safetensors` file; `weights_key` as in the module docstring.
    `meta` is plain data (numpy values as lists and numbers)."""
    from model.foreign_pickle import plain_data

    if weights_key not in WEIGHTS_KEYS:
        raise ValueError(f"weights_key must be one of {WEIGHTS_KEYS}, not {weights_key!r}")
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "checkpoint file not found"
        raise CheckpointError(f"{path}: {what}")
    if path.suffix == ".safetensors":
        if weights_key == "raw":
            raise CheckpointError(f"{path}: a .safetensors file holds one set of weights; drop --weights-key raw")
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                header = f.metadata() or {}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        meta = json.loads(header["meta"]) if "meta" in header else {}
        return _strip_prefixes(state), meta
    obj = _load_pickled(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    meta = plain_data(obj["meta"]) if isinstance(obj.get("meta"), Mapping) else {}
    if weights_key == "raw":
        raw = obj.get("ema_state_dict")
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{path}: no raw weights (no `ema_state_dict`: not a training checkpoint saved "
                                  "with an EMA hook); use --weights-key ema")
        # mmengine's averaged model wraps the detector as `module`; `steps` is the EMA's update count.
        state = {k: v for k, v in raw.items() if k.startswith("module.")}
    else:
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    state = _strip_prefixes({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
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
        size = getattr(module, "size", None)
        found = fitting_size(state)
        if found and found != size:
            raise CheckpointError(f"{source}: does not fit the model: it is an RTMDet-{found} checkpoint, not "
                                  f"RTMDet-{size}; use --size {found}")
        hint = ""
        if mismatched and size:
            hint = f" (is it really an RTMDet-{size} checkpoint with {getattr(module, 'num_classes', '?')} classes?)"
        raise CheckpointError(f"{source}: does not fit the model{hint}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_checkpoint(module: nn.Module, path: str | os.PathLike, weights_key: str = "ema") -> dict:
    """Load an official-format or bare checkpoint strictly into `module`; returns the file's meta."""
    state, meta = read_checkpoint(path, weights_key)
    load_state_dict_strict(module, state, source=str(path))
    return meta


def fitting_size(state: Mapping[str, torch.Tensor]) -> str | None:
    """The RTMDet size whose network has exactly `state`'s keys and shapes, else None."""
    from model.config import SIZES
    from model.nn.rtmdet import build_rtmdet

    num_classes = infer_num_classes(state)
    if num_classes is None:
        return None
    for size in SIZES:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            own = build_rtmdet(size, num_classes=num_classes).state_dict()
        if own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own):
            return size
    return None


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
