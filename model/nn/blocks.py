"""Building blocks of CSPNeXt and its PAFPN, with MMDetection's parameter names.

Attribute names (`conv`, `bn`, `main_conv`, `short_conv`, `final_conv`, `blocks`, `attention.fc`,
`depthwise_conv`, `pointwise_conv`) are the official state_dict layout; do not rename them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import BN_EPS, BN_MOMENTUM


class _DepthwiseConv2d(nn.Conv2d):
    """A grouped Conv2d that trains in channels_last on the CPU, whatever layout the network around it uses.

    oneDNN's backward for depthwise kernels on NCHW tensors is pathologically slow on the CPU (343 ms vs
    9.8 ms in channels_last for a 16x48x40x40 5x5 input, measured with torch 2.14): the conversion both ways
    costs far less than it saves. The Trainer runs the whole network in channels_last, which needs no
    conversion at all; inference and CUDA take the ordinary path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_grad_enabled() or _is_channels_last(x):
            return super().forward(x)
        cl = torch.channels_last
        y = F.conv2d(x.contiguous(memory_format=cl), self.weight.contiguous(memory_format=cl), self.bias,
                     self.stride, self.padding, self.dilation, self.groups)
        return y.contiguous()


def _is_channels_last(x: torch.Tensor) -> bool:
    # A (N, C, 1, 1) or C == 1 tensor is both layouts at once; only a real NHWC layout counts.
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class ConvModule(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU.

    After `fuse()` the BatchNorm lives inside the convolution's weight and bias; the module then
    computes the same function with one kernel instead of two.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        conv_cls = _DepthwiseConv2d if groups > 1 else nn.Conv2d
        self.conv = conv_cls(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into a fresh convolution (y = gamma*(Wx - mu)/sigma + beta)."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        conv = self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, groups=conv.groups, bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        # A new Conv2d on purpose: the head shares one conv across levels, but each level has its own BN.
        self.conv = fused
        self.bn = nn.Identity()


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_ch, in_ch, kernel, groups=in_ch)
        self.pointwise_conv = ConvModule(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv, then a 5x5 depthwise-separable conv, with an optional residual."""

    def __init__(self, in_ch: int, out_ch: int, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvModule(in_ch, out_ch, 3)
        self.conv2 = DepthwiseSeparableConvModule(out_ch, out_ch, 5)
        self.add_identity = add_identity and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    """Squeeze-and-excite without the bottleneck: global pool, 1x1 conv, hard sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.fc(self.global_avgpool(x)))


class CSPLayer(nn.Module):
    """Cross-stage partial layer: half the channels go through the blocks, half skip them."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, add_identity: bool,
                 channel_attention: bool, expand_ratio: float = 0.5) -> None:
        super().__init__()
        mid = int(out_ch * expand_ratio)
        self.main_conv = ConvModule(in_ch, mid, 1)
        self.short_conv = ConvModule(in_ch, mid, 1)
        self.final_conv = ConvModule(2 * mid, out_ch, 1)
        self.blocks = nn.Sequential(*(CSPNeXtBlock(mid, mid, add_identity) for _ in range(num_blocks)))
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        if self.attention is not None:
            out = self.attention(out)
        return self.final_conv(out)


class SPPFBottleneck(nn.Module):
    """Spatial pyramid pooling with the official 5/9/13 windows.

    Three chained 5x5 stride-1 max-pools give exactly the parallel 5, 9 and 13 pools (a max over a
    max is a max over the union of windows, and -inf padding never wins), at a third of the cost.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = in_ch // 2
        self.conv1 = ConvModule(in_ch, mid, 1)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.conv2 = ConvModule(mid * 4, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        p5 = self.pool(x)
        p9 = self.pool(p5)
        p13 = self.pool(p9)
        return self.conv2(torch.cat((x, p5, p9, p13), dim=1))
