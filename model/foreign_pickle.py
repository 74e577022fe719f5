"""Read training checkpoints as mmengine's Runner writes them, as data only.

Such a file is a torch zip whose pickle holds, next to the tensors, objects of classes we do not import:
`message_hub` keeps mmengine `HistoryBuffer`s (numpy arrays inside, and `getattr(HistoryBuffer, 'min')`
references to its methods), `meta`/`message_hub` may hold numpy scalars. `torch.load(weights_only=True)`
refuses them all. `load_foreign` reads such a file with torch's own weights-only unpickler and nothing else;
it only adds, for the duration of the call, the names below, each bound to a function or class of this
module that builds plain data:

- a class from an OpenMMLab package (`mmengine.*`, `mmdet.*`, ...) -> a fresh `Foreign` subclass: it keeps
  the arguments and state the pickle gives it and has no behaviour; the real class is never imported;
- `builtins.getattr` -> `_foreign_getattr`, which accepts only a `Foreign` class and returns an inert
  `ForeignRef`; any other target is refused (a real getattr would reach arbitrary callables);
- numpy's `_reconstruct`/`ndarray`/`dtype`/`scalar` -> builders that parse dtype strings and copy raw bytes
  into `np.frombuffer`; numpy's own unpickling code is never run (object arrays keep their items, which the
  same unpickler produced, as a list).

Why this is as safe as `weights_only=True`: it *is* that unpickler, with the same rules for every opcode (only
allow-listed callables may be called or instantiated, BUILD only on allow-listed types, persistent ids only
for storages). The additions never import a module, never look up an attribute on an object they did not
create, and never call anything they receive. Any other global outside torch's own allow-list (`os.system`,
`builtins.eval`, `subprocess.Popen`, ...) is refused before unpickling starts. The additions are visible to
other `torch.load` calls in this process while a load runs (torch keeps one global list); as they are inert,
that only means such a call could read an mmengine file too.
"""
from __future__ import annotations

import os
import pickle
import re
import threading
from collections.abc import Callable, Mapping

import numpy as np
import torch

# Packages whose classes become `Foreign` stand-ins: OpenMMLab's, which training checkpoints carry.
FOREIGN_PACKAGES = frozenset({"mmengine", "mmdet", "mmcv", "mmyolo", "mmpretrain", "mmcls", "mmseg", "mmrotate",
                              "mmpose", "mmdet3d", "mmtrack", "mmocr", "mmaction", "mmagic", "mmedit"})
_NUMPY_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_NUMPY_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
# A dtype string numpy parses without importing anything: kind, optional byte order, optional size.
_DTYPE_STRING = re.compile(r"^[<>=|]?[?bBhHiIlLqQpPefdgFDGSUVOMm][0-9]*$")
_LOCK = threading.Lock()


class ForeignPickleError(pickle.UnpicklingError):
    """The pickle asks for something this reader will not build; the message says what."""


class Foreign:
    """Stand-in for an object of a class we do not import; `foreign_name` says which class it was."""

    foreign_name = "?"

    def __new__(cls, *args):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.foreign_name} (not loaded)>"


class ForeignRef:
    """`getattr(SomeForeignClass, name)`: a reference to a method we do not have. Not callable."""

    def __init__(self, name: str) -> None:
        self.foreign_name = name

    def __repr__(self) -> str:
        return f"<{self.foreign_name} (not loaded)>"


def _foreign_class(name: str) -> type[Foreign]:
    return type(name.rsplit(".", 1)[-1], (Foreign,), {"foreign_name": name, "__module__": __name__})


def _foreign_getattr(obj, name):
    if isinstance(obj, type) and issubclass(obj, Foreign) and type(name) is str:
        return ForeignRef(f"{obj.foreign_name}.{name}")
    raise ForeignPickleError(f"getattr on {type(obj).__name__} objects is not allowed")


class _NdarrayType:
    """What the pickle names `numpy.ndarray`; only useful as `_reconstruct`'s first argument."""


class NumpyDType:
    """A numpy dtype described by the pickle: `numpy.dtype(code, align, copy)`, then BUILD with the byte order."""

    def __init__(self, code, align=False, copy=True) -> None:
        if type(code) is not str or not _DTYPE_STRING.match(code):
            raise ForeignPickleError(f"numpy dtype {code!r} is not a plain numeric or string dtype")
        self.dtype = np.dtype(code)

    def __setstate__(self, state) -> None:
        # (version, byte order, subdtype, names, fields, elsize, alignment, flags); only plain dtypes here.
        if not isinstance(state, tuple) or len(state) < 2 or any(s is not None for s in state[2:5]):
            raise ForeignPickleError("structured numpy dtypes are not read")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class NumpyArray:
    """`_reconstruct(ndarray, shape, dtype)` + BUILD (version, shape, dtype, fortran, data) -> `.array`."""

    def __init__(self, subtype=None, shape=None, code=None) -> None:
        if subtype is not _NdarrayType:
            raise ForeignPickleError("numpy _reconstruct is only read for plain ndarrays")
        self.array: np.ndarray | list | None = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], NumpyDType):
            raise ForeignPickleError("numpy array state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise ForeignPickleError(f"numpy array shape {shape!r} is not a tuple of sizes")
        if dtype.dtype.kind == "O":  # the items were unpickled by the same rules; keep them as a list
            self.array = list(data) if isinstance(data, list) else None
            return
        if not isinstance(data, (bytes, bytearray)) or len(data) != int(np.prod(shape)) * dtype.dtype.itemsize:
            raise ForeignPickleError("numpy array data does not match its shape and dtype")
        flat = np.frombuffer(bytes(data), dtype=dtype.dtype).copy()
        self.array = flat.reshape(shape, order="F" if fortran else "C")


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, NumpyDType) or dtype.dtype.kind == "O" or not isinstance(data, (bytes, bytearray)) \
            or len(data) != dtype.dtype.itemsize:
        raise ForeignPickleError("numpy scalar is not a plain number")
    return np.frombuffer(bytes(data), dtype=dtype.dtype)[0]


def _stand_ins(names: set[str]) -> tuple[list[tuple[Callable, str]], list[str]]:
    """(safe_globals entries for `names`, the names this reader refuses)."""
    fixed: dict[str, Callable] = {"builtins.getattr": _foreign_getattr, "numpy.ndarray": _NdarrayType,
                                  "numpy.dtype": NumpyDType}
    fixed.update({n: NumpyArray for n in _NUMPY_RECONSTRUCT})
    fixed.update({n: _numpy_scalar for n in _NUMPY_SCALAR})
    entries: list[tuple[Callable, str]] = []
    refused = []
    for name in sorted(names):
        if name in fixed:
            entries.append((fixed[name], name))
        elif name.split(".", 1)[0] in FOREIGN_PACKAGES:
            entries.append((_foreign_class(name), name))
        else:
            refused.append(name)
    return entries, refused


def foreign_globals(path: str | os.PathLike) -> list[str]:
    """The globals in a torch zip file that torch's weights-only unpickler would refuse (scanned, not run)."""
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def load_foreign(path: str | os.PathLike, names: list[str] | None = None):
    """`torch.load(path, weights_only=True)` that also reads mmengine's objects as data (module docstring).
    Raises ForeignPickleError naming any global it refuses. Numpy arrays are still `NumpyArray` holders in the
    result: `plain_data` turns a part of it into plain Python."""
    names = foreign_globals(path) if names is None else names
    entries, refused = _stand_ins(set(names))
    if refused:
        raise ForeignPickleError(f"the pickle refers to {', '.join(refused)}, which is neither weights nor data "
                                 "(only torch, numpy and OpenMMLab objects are read)")
    # BUILD (a __setstate__ call) is allowed on instances of these entries' types: stand-ins and numpy holders.
    with _LOCK, torch.serialization.safe_globals(entries):
        return torch.load(path, map_location="cpu", weights_only=True)


def plain_data(obj, _seen: dict[int, object] | None = None):
    """`obj` with numpy holders turned into lists and numbers and stand-ins into their description strings,
    so that `torch.load(weights_only=True)` and JSON can hold it."""
    seen = {} if _seen is None else _seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, NumpyArray):
        out = obj.array.tolist() if isinstance(obj.array, np.ndarray) else plain_data(obj.array, seen)
    elif isinstance(obj, np.generic):
        out = obj.item()
    elif isinstance(obj, (Foreign, ForeignRef, NumpyDType, type)):
        out = repr(obj)
    elif isinstance(obj, Mapping):
        out = {}
        seen[id(obj)] = out
        out.update({plain_data(k, seen): plain_data(v, seen) for k, v in obj.items()})
    elif isinstance(obj, (list, tuple, set)):
        items = [plain_data(v, seen) for v in obj]
        out = items if isinstance(obj, list) else tuple(items) if isinstance(obj, tuple) else set(items)
    else:
        out = obj
    seen[id(obj)] = out
    return out
