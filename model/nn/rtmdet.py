"""RTMDet = CSPNeXt backbone + CSPNeXtPAFPN neck + SepBN head."""
from __future__ import annotations

import copy

import torch
from torch import nn

from model.config import model_spec
from model.nn.backbone import CSPNeXt
from model.nn.blocks import ConvModule
from model.nn.head import RTMDetSepBNHead
from model.nn.neck import CSPNeXtPAFPN


class RTMDet(nn.Module):
    def __init__(self, size: str, num_classes: int = 80) -> None:
        super().__init__()
        spec = model_spec(size)
        self.size = size
        self.num_classes = num_classes
        self.backbone = CSPNeXt(spec.deepen_factor, spec.widen_factor)
        self.neck = CSPNeXtPAFPN(spec.neck_in_channels, spec.head_channels, spec.neck_csp_blocks)
        self.bbox_head = RTMDetSepBNHead(num_classes, spec.head_channels, spec.head_channels, spec.exp_on_reg)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Normalised (B, 3, H, W) batch -> (class logits per level, ltrb pixel distances per level)."""
        return self.bbox_head(self.neck(self.backbone(x)))


def build_rtmdet(size: str, num_classes: int = 80) -> RTMDet:
    """The network for one official size, with the official state_dict layout."""
    return RTMDet(size, num_classes)


def fused_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into its convolution.

    The copy is for inference only: its state_dict no longer has the official layout, so load and
    save checkpoints with the original module.
    """
    fused = copy.deepcopy(model).eval()
    for m in fused.modules():
        if isinstance(m, ConvModule):
            m.fuse()
    return fused
