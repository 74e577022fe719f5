"""Winograd F(4x4, 3x3) for the network's wide 3x3 convolutions, for the eager and inductor runners on the CPU.

A stride-1 3x3 convolution computes each 4x4 block of outputs from a 6x6 block of input. Winograd's minimal
filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) does that with 36
multiplications per channel pair where the direct form needs 144: the input block and the kernel are each
carried into a 6x6 "transform" space by fixed matrices (B, G), multiplied there element by element (which over
the channels is 36 independent matrix products), and the product is carried back to a 4x4 block by a third (A).
Four times fewer multiply-adds; the cost moves into the transforms, which read and write memory but only add
and scale. oneDNN (which both torch and OpenVINO call here) and ONNX Runtime's MLAS run these convolutions
directly on the CPU.

Three steps: the input transform and the output transform (plus the bias) are a small C file
(kernels/winograd_f43.c), built once per CPU by the system's C compiler and called through ctypes; the 36
products are one `torch.bmm`. In a graph for `torch.compile` the two transforms are custom ops (opaque to
inductor, which compiles the rest as before); in eager they are plain calls. A first version wrote the
transforms in torch ops for inductor to fuse: as fast, but inductor took 498.6 s to compile RTMDet-tiny with it
(24.9 s without), generating code for the 36-term sums.

Where it pays: one thread, batch 1, the Zen 4 VM, 96->96 channels at 80x80 (the head's widest): 9.85 ms direct
(oneDNN) against 4.99 ms, of which the products 3.7 ms and the transforms 0.66 + 0.52 ms; at 40x40 2.40 against
0.92 ms. The first version's sweep of the network's shapes set
`MIN_CHANNELS`: 96->96 1.44-1.75x, 192->192 1.7x, 48->48 at 80x80 1.08x, the stem's 12->24 at 320x320 0.67x
and 24->24 at 160x160 0.75x (too few channels: the transforms cost more than the products save).
`bench/bench_winograd.py --convs` measures each shape again.

Accuracy: the transform matrices hold fractions (1/4, 1/6, 1/24); in float32 one 96->96 convolution's output
differs from the direct one by ~6e-6 of its peak. The runners' choice (`model.inference.runner_choice`) and
the tests hold the whole network to the same 1e-4 bound as every other runner.
"""
from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from model.nn.blocks import ConvModule

# F(4x4, 3x3) with the interpolation points 0, +-1, +-2 (Lavin & Gray, section 4.2): output tile M, input tile A.
M = 4
A = M + 2
B_T = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0),
     (-1 / 6, -1 / 6, -1 / 6),
     (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6),
     (1 / 24, -1 / 12, 1 / 6),
     (0, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))

# Below this many input or output channels the transforms cost more than the 4x fewer products save (module
# docstring: 48 channels was break-even, 96 a clear gain).
MIN_CHANNELS = 64

ENABLE_ENV = "RTMDET_WINOGRAD"
KERNEL_SOURCE = Path(__file__).with_name("kernels") / "winograd_f43.c"
COMPILE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99")
# OpenMP when the compiler has it (gcc does): the tiles are then cut over torch's own threads (kernels/*.c says why
# that is torch's pool); without it the same source builds for one thread.
OPENMP_FLAGS = ("-fopenmp",)
ACT_NONE, ACT_SILU = 0, 1  # the output transform's activation, as the C file numbers them


def winograd_enabled() -> bool:
    """Off with `RTMDET_WINOGRAD=0` (direct convolutions everywhere, e.g. to compare against them)."""
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class KernelBuild:
    """The transforms' shared library, built once per source, compiler flags and CPU into `kernel_dir()` by the
    system's C compiler (`$CC`, else `cc`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.library: ctypes.CDLL | None = None
        self.error: str | None = None

    def load(self) -> ctypes.CDLL | None:
        with self.lock:
            if self.library is None and self.error is None:
                try:
                    self.library = self._build()
                except (OSError, subprocess.SubprocessError) as e:
                    self.error = f"{type(e).__name__}: {e}"
            return self.library

    def _build(self) -> ctypes.CDLL:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc, gcc or $CC) to build the Winograd transforms")
        source = KERNEL_SOURCE.read_bytes()
        # -march=native: a library built on one CPU may not run on another, so the CPU's flags are in the key.
        key = hashlib.sha256(source + " ".join((compiler, *COMPILE_FLAGS, *OPENMP_FLAGS, platform.machine(),
                                                 cpu_flags())).encode()).hexdigest()[:16]
        target = kernel_dir() / f"winograd_f43-{key}.so"
        if not target.exists():
            # Built beside the target and renamed: a concurrent process never loads half a file.
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                command = [compiler, *COMPILE_FLAGS, "-o", str(built), str(KERNEL_SOURCE)]
                try:
                    subprocess.run([*command, *OPENMP_FLAGS], check=True, capture_output=True, timeout=120)
                except subprocess.CalledProcessError:  # a compiler without OpenMP (clang without libomp)
                    subprocess.run(command, check=True, capture_output=True, timeout=120)
                os.replace(built, target)
        library = ctypes.CDLL(str(target))
        library.winograd_input.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_long] * 7]
        library.winograd_output.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_long] * 8]
        library.winograd_input.restype = library.winograd_output.restype = None
        return library


def kernel_dir() -> Path:
    """Where built libraries live: `$RTMDET_HOME/kernels` (model.zoo.cache_dir), else, on a read-only home (a
    Kubernetes pod's root filesystem), a folder of this user's own under the temp dir. A library is code this
    process will load, so that folder must be this user's and writable by no one else."""
    from model.zoo import cache_dir

    home = cache_dir() / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    private = Path(tempfile.gettempdir()) / f"rtmdet-kernels-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{private} is not this user's alone; not loading code from it")
    return private


def cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((ln for ln in lines if ln.startswith(("flags", "Features"))), platform.processor())


KERNELS = KernelBuild()


def input_transform(x: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """(N, H, W, C) NHWC float32 -> (36, N th tw, C): every 6x6 input tile's B^T d B, the convolution's zero
    padding (and the far edges' up to whole tiles) read as zeros."""
    x = x.contiguous()
    n, h, w, c = x.shape
    v = x.new_empty((A * A, n * tiles_h * tiles_w, c))
    KERNELS.load().winograd_input(x.data_ptr(), v.data_ptr(), n, h, w, c, tiles_h, tiles_w, torch.get_num_threads())
    return v


def output_transform(prod: torch.Tensor, bias: torch.Tensor, n: int, h: int, w: int, tiles_h: int,
                     tiles_w: int, silu: bool) -> torch.Tensor:
    """(36, N th tw, K) products -> (N, h, w, K) NHWC float32: every tile's A^T m A plus the bias, cropped, and
    with `silu` the SiLU of that."""
    prod, bias = prod.contiguous(), bias.contiguous()
    k = prod.shape[2]
    y = prod.new_empty((n, h, w, k))
    KERNELS.load().winograd_output(prod.data_ptr(), bias.data_ptr(), y.data_ptr(), n, h, w, k, tiles_h, tiles_w,
                                   ACT_SILU if silu else ACT_NONE, torch.get_num_threads())
    return y


_registered = threading.Lock()


def register_compiled_ops() -> None:
    """The transforms as torch custom ops (`torch.ops.rtmdet.winograd_input/output`), which `torch.compile`
    keeps as opaque calls, with the shapes they give. Only for compiled graphs: a custom op's eager call
    imports torch._dynamo (seconds), which the serving path never needs."""
    with _registered:
        if hasattr(torch.ops.rtmdet, "winograd_input"):
            return
        ops = {
            "winograd_input": (input_transform, lambda x, th, tw: x.new_empty(
                (A * A, x.shape[0] * th * tw, x.shape[3]))),
            "winograd_output": (output_transform, lambda prod, bias, n, h, w, th, tw, silu: prod.new_empty(
                (n, h, w, prod.shape[2]))),
        }
        for name, (impl, fake) in ops.items():
            torch.library.custom_op(f"rtmdet::{name}", impl, mutates_args=()).register_fake(fake)


_EAGER_OPS = SimpleNamespace(winograd_input=input_transform, winograd_output=output_transform)


class WinogradConv2d(nn.Module):
    """A stride-1, padding-1, 3x3 `nn.Conv2d` (groups 1, bias or not) as Winograd F(4x4, 3x3), float32.

    Takes and returns NCHW tensors; the work is done in NHWC (a channels_last tensor's own memory order), so
    that the channels, the GEMM's inner dimension, are contiguous. `silu`: the SiLU that follows the convolution
    is applied inside the output transform (`with_winograd` takes it from a ConvModule), saving its own pass."""

    def __init__(self, conv: nn.Conv2d, compiled: bool = False, silu: bool = False) -> None:
        super().__init__()
        # `compiled`: for a network torch.compile traces (the transforms as custom ops); else plain calls.
        self.compiled, self.silu = compiled, silu
        if compiled:
            register_compiled_ops()
        if not eligible(conv, min_channels=1):
            raise ValueError(f"not a stride-1 padding-1 3x3 float32 convolution without groups: {conv}")
        w = conv.weight.detach().double()  # (K, C, 3, 3); the kernel transform in float64, rounded once
        g = torch.tensor(G, dtype=torch.float64)
        u = torch.einsum("ar,kcrs,bs->abck", g, w, g).reshape(A * A, conv.in_channels, conv.out_channels)
        self.register_buffer("u", u.float().contiguous())
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.float())
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tiles_h, tiles_w = -(-h // M), -(-w // M)
        ops = torch.ops.rtmdet if self.compiled else _EAGER_OPS
        v = ops.winograd_input(x.permute(0, 2, 3, 1), tiles_h, tiles_w)  # NHWC: a channels_last tensor's memory
        prod = torch.bmm(v, self.u)  # the 36 products, each over the channels: (36, tiles, K)
        return ops.winograd_output(prod, self.bias, n, h, w, tiles_h, tiles_w, self.silu).permute(0, 3, 1, 2)


def eligible(conv: nn.Module, min_channels: int = MIN_CHANNELS) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu"
            and min(conv.in_channels, conv.out_channels) >= min_channels)


def with_winograd(net: nn.Module, min_channels: int = MIN_CHANNELS,
                  compiled: bool = False) -> tuple[nn.Module, int]:
    """A copy of `net` whose eligible 3x3 convolutions are `WinogradConv2d`s (`compiled`: for torch.compile),
    and how many were swapped; `net` itself (0) when switched off or the transforms cannot be built here (no C
    compiler). The original is untouched (the reference eager runner and the exports keep reading it). A
    ConvModule whose BatchNorm is folded (`fuse()`) hands its SiLU to the Winograd convolution."""
    if not winograd_enabled():
        return net, 0
    if KERNELS.load() is None:
        warnings.warn(f"Winograd convolutions off: {KERNELS.error}", stacklevel=2)
        return net, 0
    net = copy.deepcopy(net)
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child, min_channels):
                # ConvModule.forward is act(bn(conv(x))): with bn folded away, the SiLU can move into the conv.
                fold_act = (isinstance(parent, ConvModule) and name == "conv"
                            and isinstance(parent.bn, nn.Identity) and isinstance(parent.act, nn.SiLU))
                setattr(parent, name, WinogradConv2d(child, compiled, silu=fold_act))
                if fold_act:
                    parent.act = nn.Identity()
                swapped += 1
    return net, swapped
