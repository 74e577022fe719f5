"""CSPNeXt, the RTMDet backbone (arch P5)."""
from __future__ import annotations

import torch
from torch import nn

from model.nn.blocks import ConvModule, CSPLayer, SPPFBottleneck

# (in channels, out channels, blocks, residual, SPPF) per stage before width/depth scaling.
_P5_STAGES = ((64, 128, 3, True, False), (128, 256, 6, True, False),
              (256, 512, 6, True, False), (512, 1024, 3, False, True))


class CSPNeXt(nn.Module):
    """Stem of three 3x3 convs, then four stride-2 stages; returns stages 2, 3 and 4 (strides 8/16/32)."""

    def __init__(self, deepen_factor: float, widen_factor: float) -> None:
        super().__init__()
        stem = int(_P5_STAGES[0][0] * widen_factor)
        self.stem = nn.Sequential(
            ConvModule(3, stem // 2, 3, stride=2),
            ConvModule(stem // 2, stem // 2, 3),
            ConvModule(stem // 2, stem, 3),
        )
        for i, (cin, cout, blocks, residual, spp) in enumerate(_P5_STAGES, start=1):
            cin, cout = int(cin * widen_factor), int(cout * widen_factor)
            layers: list[nn.Module] = [ConvModule(cin, cout, 3, stride=2)]
            if spp:
                layers.append(SPPFBottleneck(cout, cout))
            layers.append(CSPLayer(cout, cout, max(round(blocks * deepen_factor), 1),
                                   add_identity=residual, channel_attention=True))
            self.add_module(f"stage{i}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return c3, c4, c5
