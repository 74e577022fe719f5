"""The network's 1x1 convolutions as one matrix product over NHWC rows, where torch would take its native path.

torch's convolution runs a 1x1, stride-1 filter with its own native code (THNN), not oneDNN, when it runs on one
thread with a batch under 16 (`ConvParams::use_mkldnn`: "THNN is faster when single-threaded"). That is every 1x1
convolution of the eager runner on one thread, and of every one-thread stream a batch is cut over
(model.inference.streams): the service's full-load path. In one hour's runs on a channels_last network the SiLU
after each of them ran about 3x slower than after this path (RTMDet-tiny, batch 1, one thread, torch's profiler:
`aten::silu_` 32.5 ms a forward after the native path, 10.7 ms after this one; the products themselves 25.3 ms and
25.6 ms). An hour later the same profile gave 11.0 and 11.5 ms: the slow SiLU was a state of the machine that
the native path's output met and this path's did not, cause not found.

A 1x1 convolution of an NHWC tensor is one matrix product: the (N*H*W, C) rows of the input times the (K, C)
weight, transposed, plus the bias. `F.linear` on the permuted view does that, and its (N, H, W, K) result is
already the channels_last output. The product is MKL's sgemm, which the native path calls too, and the outputs
were the same bits (RTMDet-tiny, one thread, batch 1 and 4). Elsewhere (two threads or more, a batch of 16 or
more, an NCHW input) the convolution runs as before, on oneDNN.

Measured (2026-12-07, the 2-core Intel Xeon VM with AVX-512, RTMDet-tiny and s at 640, eager with Winograd,
`bench/bench_pointwise.py --rounds 8`): 1.02-1.10x on one thread and 1.03-1.04x at batch 8 on two one-thread
streams at 22:44 UTC, the service 1.10-1.15x (bench/bench_revisions.py, docs/service.md); at 23:40 UTC, with the
SiLU no longer slow, 0.97-1.03x and the service 1.025x (per round 0.96-1.14): no loss beyond the noise, the
same bits at batch 1, so it stays.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# Where torch's convolution takes its native path for a 1x1 filter: one thread and a batch under this.
NATIVE_BATCH_LIMIT = 16


def eligible(conv: nn.Module) -> bool:
    """A plain 1x1, stride-1, unpadded, ungrouped float32 convolution on the CPU."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32
            and conv.weight.device.type == "cpu")


class PointwiseConv2d(nn.Module):
    """A 1x1 `nn.Conv2d` that, where torch would run it natively on a channels_last input, runs as one `F.linear`
    over the input's NHWC rows instead (the same product, a channels_last output); else the convolution itself."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"not a 1x1 stride-1 unpadded float32 convolution without groups: {conv}")
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and x.shape[0] < NATIVE_BATCH_LIMIT and torch.get_num_threads() == 1
                and x.is_contiguous(memory_format=torch.channels_last)):
            # The (K, C, 1, 1) weight seen as the (K, C) matrix: a view, in either memory format.
            return F.linear(x.permute(0, 2, 3, 1), self.conv.weight[:, :, 0, 0], self.conv.bias).permute(0, 3, 1, 2)
        return self.conv(x)


def with_pointwise_gemm(net: nn.Module, inplace: bool = False) -> tuple[nn.Module, int]:
    """`net` (a copy, unless `inplace`) with every eligible 1x1 convolution wrapped in `PointwiseConv2d`, and how
    many were."""
    if not inplace:
        net = copy.deepcopy(net)
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child):
                setattr(parent, name, PointwiseConv2d(child))
                swapped += 1
    return net, swapped
