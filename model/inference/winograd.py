"""Winograd F(4x4, 3x3) for the network's 3x3 convolutions of 24 channels or more, for the eager and inductor
runners on the CPU.

A stride-1 3x3 convolution computes each 4x4 block of outputs from a 6x6 block of input. Winograd's minimal
filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) does that with 36
multiplications per channel pair where the direct form needs 144: the input block and the kernel are each
carried into a 6x6 "transform" space by fixed matrices (B, G), multiplied there element by element (which over
the channels is 36 independent matrix products), and the product is carried back to a 4x4 block by a third (A).
Four times fewer multiply-adds; the cost moves into the transforms, which read and write memory but only add
and scale. oneDNN (which both torch and OpenVINO call here) and ONNX Runtime's MLAS run these convolutions
directly on the CPU.

One C call per convolution (kernels/winograd_f43.c, built once per CPU by the system's C compiler, called
through ctypes), a block of tiles at a time: the block's input transform, its 36 products (a register-blocked
GEMM against the kernel, transformed and packed once here), its output transform plus the bias and, when a
ConvModule's SiLU follows, the SiLU. A block's intermediates stay in the core's L2 cache; blocks are cut over
torch's own OpenMP threads. In a graph for `torch.compile` the call is a custom op (opaque to inductor, which
compiles the rest as before); in eager a plain call.

How it got there (2026-12-07, the 2-core Zen 4 VM, /tmp micro-benchmarks, batch 1, SiLU included):
- The first version wrote the transforms in torch ops for inductor to fuse: as fast, but inductor took 498.6 s
  to compile RTMDet-tiny with it (24.9 s without), generating code for the 36-term sums.
- The second kept the transforms in C but left the products to one `torch.bmm` over all tiles: 96->96 at
  80x80, one thread, 5.09 ms against 10.8 ms direct. The bmm (MKL, which takes its AVX2 path on this AMD CPU:
  56-76 GFLOP/s) was most of it, and the transformed input and products (5.5 MB each) went through memory.
- This one, fused per block: 3.52 ms (1.45x the second; 2.10x at batch 8, where the second's intermediates were
  8x larger). Its GEMM ran at 54 GFLOP/s until the build added `-ffp-contract=fast` (ISO C mode had kept every
  multiply-add as two instructions), then 83.
- On two threads a small map made few blocks (96->96 at 20x20: two, of 18 tiles and 7; 192->192 at 20x20: five,
  three on one thread), cut statically, and a short group of tiles cost a whole group's products. Blocks of at
  most a quarter of a thread's share under a dynamic schedule, and products for only the group's own rows, made
  tiny's shapes 1.03-1.27x faster on two threads at batch 1 with the same bits, and the network 1.04-1.09x
  (tiny and s, batch 1, eager and inductor; the old and the new library swapped in one process, alternating).
- Against the direct convolution (oneDNN) with SiLU, per shape, 1 / 2 threads: 96->96 at 80x80 2.88x / 1.72x,
  64->64 at 80x80 2.43x / 1.89x, 48->48 at 80x80 1.56x / 1.94x, 24->24 at 160x160 1.32x / 1.16x, but the stem's
  12->24 at 320x320 0.82x / 1.20x: hence `MIN_CHANNELS` 24. `bench/bench_winograd.py --convs` measures each
  shape of tiny again.

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
# docstring: 24 -> 24 still gained, the stem's 12 -> 24 lost on one thread).
MIN_CHANNELS = 24

ENABLE_ENV = "RTMDET_WINOGRAD"
KERNEL_SOURCE = Path(__file__).with_name("kernels") / "winograd_f43.c"
# -ffp-contract=fast: ISO C mode (-std=c99) would otherwise keep every a * b + c as two instructions, no FMA (the
# GEMM ran at half speed without it).
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c99")
# OpenMP when the compiler has it (gcc does): the blocks of tiles are then cut over torch's own threads
# (kernels/*.c says why that is torch's pool); without it the same source builds for one thread.
OPENMP_FLAGS = ("-fopenmp",)
ACT_NONE, ACT_SILU = 0, 1  # the output transform's activation, as the C file numbers them
PANEL = 32  # output channels per packed kernel panel: the C file's NR


def kernel_version() -> str:
    """A fingerprint of the kernel's source: what an `auto` choice measured with Winograd was measured with."""
    return hashlib.sha256(KERNEL_SOURCE.read_bytes()).hexdigest()[:12]


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
        library.winograd_conv.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_long] * 9]
        library.winograd_conv.restype = ctypes.c_long
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


def pack_kernel(u: torch.Tensor) -> torch.Tensor:
    """(36, C, K) transformed kernel -> (36, Kp / PANEL, C, PANEL), the GEMM's panels of PANEL output channels
    (Kp: K rounded up to PANEL, zeros in the padding), as kernels/winograd_f43.c reads it."""
    elements, c, k = u.shape
    kp = -(-k // PANEL) * PANEL
    padded = torch.nn.functional.pad(u, (0, kp - k))
    return padded.reshape(elements, c, kp // PANEL, PANEL).permute(0, 2, 1, 3).contiguous()


def winograd_conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, out_channels: int,
                  silu: bool) -> torch.Tensor:
    """(N, H, W, C) NHWC float32 -> (N, H, W, K) NHWC float32: the 3x3 stride-1 padding-1 convolution whose
    transformed, packed kernel is `u` (`pack_kernel`), plus `bias`, and with `silu` the SiLU of that."""
    x, u, bias = x.contiguous(), u.contiguous(), bias.contiguous()
    n, h, w, c = x.shape
    y = x.new_empty((n, h, w, out_channels))
    status = KERNELS.load().winograd_conv(x.data_ptr(), u.data_ptr(), bias.data_ptr(), y.data_ptr(), n, h, w, c,
                                          out_channels, -(-h // M), -(-w // M), ACT_SILU if silu else ACT_NONE,
                                          torch.get_num_threads())
    if status != 0:
        raise MemoryError("the Winograd convolution could not allocate its per-thread scratch")
    return y


_registered = threading.Lock()


def register_compiled_ops() -> None:
    """The convolution as a torch custom op (`torch.ops.rtmdet.winograd_conv`), which `torch.compile` keeps as an
    opaque call, with the shape it gives. Only for compiled graphs: a custom op's eager call imports
    torch._dynamo (seconds), which the serving path never needs."""
    with _registered:
        if hasattr(torch.ops.rtmdet, "winograd_conv"):
            return
        torch.library.custom_op("rtmdet::winograd_conv", winograd_conv, mutates_args=()).register_fake(
            lambda x, u, bias, out_channels, silu: x.new_empty((*x.shape[:3], out_channels)))



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
        self.register_buffer("u", pack_kernel(u.float()))
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.float())
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = torch.ops.rtmdet.winograd_conv if self.compiled else winograd_conv
        # NHWC in and out: a channels_last tensor's own memory order, so neither permute copies.
        y = conv(x.permute(0, 2, 3, 1), self.u, self.bias, self.out_channels, self.silu)
        return y.permute(0, 3, 1, 2)


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
