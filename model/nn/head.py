"""RTMDetSepBNHead: convolutions shared across pyramid levels, BatchNorm kept per level.

Sharing the 3x3 convs lets every level see the same detector, while separate BN statistics absorb
the different feature distributions of strides 8, 16 and 32 (RTMDet paper, section 3.2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from model.config import STRIDES
from model.nn.blocks import ConvModule


class RTMDetSepBNHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, feat_channels: int, exp_on_reg: bool,
                 stacked_convs: int = 2, strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.exp_on_reg = exp_on_reg
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        self.rtm_cls = nn.ModuleList()
        self.rtm_reg = nn.ModuleList()
        for _ in self.strides:
            self.cls_convs.append(nn.ModuleList(
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3) for i in range(stacked_convs)))
            self.reg_convs.append(nn.ModuleList(
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3) for i in range(stacked_convs)))
            self.rtm_cls.append(nn.Conv2d(feat_channels, num_classes, 1))
            self.rtm_reg.append(nn.Conv2d(feat_channels, 4, 1))
        for level in range(1, len(self.strides)):
            for i in range(stacked_convs):
                self.cls_convs[level][i].conv = self.cls_convs[0][i].conv
                self.reg_convs[level][i].conv = self.reg_convs[0][i].conv
        self.init_weights()

    def init_weights(self) -> None:
        """Official initialisation: N(0, 0.01) convs and a classification prior of 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for conv in self.rtm_cls:
            nn.init.constant_(conv.bias, prior_bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: class logits (B, C, H, W) and ltrb distances in input pixels (B, 4, H, W)."""
        cls_scores, bbox_preds = [], []
        for level, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_feat = x
            for layer in self.cls_convs[level]:
                cls_feat = layer(cls_feat)
            reg_feat = x
            for layer in self.reg_convs[level]:
                reg_feat = layer(reg_feat)
            reg = self.rtm_reg[level](reg_feat)
            if self.exp_on_reg:
                reg = reg.exp()
            cls_scores.append(self.rtm_cls[level](cls_feat))
            bbox_preds.append(reg * stride)
        return cls_scores, bbox_preds
