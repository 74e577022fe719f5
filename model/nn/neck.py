"""CSPNeXtPAFPN: a top-down then bottom-up path aggregation network built from CSP layers."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.nn.blocks import ConvModule, CSPLayer


class CSPNeXtPAFPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int, num_csp_blocks: int) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        # Index 0 handles the coarsest pair (c5 -> c4), as in the official module order.
        self.reduce_layers = nn.ModuleList([ConvModule(c5, c4, 1), ConvModule(c4, c3, 1)])
        self.top_down_blocks = nn.ModuleList([
            CSPLayer(c4 * 2, c4, num_csp_blocks, add_identity=False, channel_attention=False),
            CSPLayer(c3 * 2, c3, num_csp_blocks, add_identity=False, channel_attention=False),
        ])
        self.downsamples = nn.ModuleList([ConvModule(c3, c3, 3, stride=2), ConvModule(c4, c4, 3, stride=2)])
        self.bottom_up_blocks = nn.ModuleList([
            CSPLayer(c3 * 2, c4, num_csp_blocks, add_identity=False, channel_attention=False),
            CSPLayer(c4 * 2, c5, num_csp_blocks, add_identity=False, channel_attention=False),
        ])
        self.out_convs = nn.ModuleList([ConvModule(c, out_channels, 3) for c in (c3, c4, c5)])

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        c3, c4, c5 = feats
        p5 = self.reduce_layers[0](c5)
        p4 = self.top_down_blocks[0](torch.cat((F.interpolate(p5, scale_factor=2.0, mode="nearest"), c4), 1))
        p4 = self.reduce_layers[1](p4)
        p3 = self.top_down_blocks[1](torch.cat((F.interpolate(p4, scale_factor=2.0, mode="nearest"), c3), 1))
        n4 = self.bottom_up_blocks[0](torch.cat((self.downsamples[0](p3), p4), 1))
        n5 = self.bottom_up_blocks[1](torch.cat((self.downsamples[1](n4), p5), 1))
        return tuple(conv(f) for conv, f in zip(self.out_convs, (p3, n4, n5)))
