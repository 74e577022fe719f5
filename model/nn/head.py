"""RTMDetSepBNHead: convolutions shared across pyramid levels, BatchNorm kept per level.

Sharing the 3x3 convs lets every level see the same detector, while separate BN statistics absorb
the different feature distributions of strides 8, 16 and 32 (RTMDet paper, section 3.2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from model.assigner import DynamicSoftLabelAssigner
from model.boxes import distance2bbox, grid_priors
from model.config import STRIDES
from model.losses import at_least_float32, giou_loss, quality_focal_loss
from model.nn.blocks import ConvModule

_FLOAT32_EPS = torch.finfo(torch.float32).eps  # MMDetection divides sums by (avg_factor + this)


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
        return ([self.class_logits(level, x) for level, x in enumerate(feats)],
                [self.box_distances(level, x) for level, x in enumerate(feats)])

    def class_logits(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """The class branch of one level: neck features (B, F, H, W) -> logits (B, C, H, W)."""
        for layer in self.cls_convs[level]:
            x = layer(x)
        return self.rtm_cls[level](x)

    def box_distances(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """The box branch of one level: neck features (B, F, H, W) -> ltrb distances in input pixels (B, 4, H, W)."""
        for layer in self.reg_convs[level]:
            x = layer(x)
        reg = self.rtm_reg[level](x)
        if self.exp_on_reg:
            reg = reg.exp()
        return reg * self.strides[level]

    def loss(self, cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor],
             gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor],
             assigner: DynamicSoftLabelAssigner | None = None, loss_bbox_weight: float = 2.0
             ) -> dict[str, list[torch.Tensor]]:
        """Training loss, as MMDetection's `RTMDetHead.loss_by_feat` computes and normalises it.

        `gt_boxes[i]` (Ni, 4) xyxy input pixels and `gt_labels[i]` (Ni,) of image i. All images share the
        input size (no padding masks). Returns {'loss_cls': [per level], 'loss_bbox': [per level]}: QFL summed
        over priors and GIoU (x2) weighted by the assigned IoU, each divided by the sum of positive IoUs
        (clamped at 1, averaged over processes when distributed).
        """
        assigner = assigner or DynamicSoftLabelAssigner()
        num_imgs, num_classes = cls_scores[0].shape[:2]
        device = cls_scores[0].device
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        counts = [h * w for h, w in sizes]
        priors = grid_priors(sizes, self.strides, device=device)
        flat_cls = torch.cat([at_least_float32(c).permute(0, 2, 3, 1).reshape(num_imgs, -1, num_classes)
                              for c in cls_scores], 1)
        flat_reg = torch.cat([at_least_float32(r).permute(0, 2, 3, 1).reshape(num_imgs, -1, 4) for r in bbox_preds], 1)
        decoded = distance2bbox(priors[None], flat_reg)  # (B, P, 4), unclamped

        labels = torch.full(flat_cls.shape[:2], num_classes, dtype=torch.long, device=device)
        quality = flat_cls.new_zeros(flat_cls.shape[:2])
        targets = decoded.new_zeros(decoded.shape)
        det_cls, det_boxes = flat_cls.detach(), decoded.detach()
        for i in range(num_imgs):
            boxes_i = gt_boxes[i].to(device=device, dtype=flat_reg.dtype).reshape(-1, 4)
            labels_i = gt_labels[i].to(device=device, dtype=torch.long).reshape(-1)
            res = assigner.assign(priors, det_cls[i], det_boxes[i], boxes_i, labels_i)
            pos = res.positive
            labels[i, pos] = labels_i[res.gt_index[pos]]
            quality[i, pos] = res.iou[pos]
            targets[i, pos] = boxes_i[res.gt_index[pos]]

        level_of = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                           torch.tensor(counts, device=device))
        qfl = quality_focal_loss(flat_cls.reshape(-1, num_classes), labels.reshape(-1), quality.reshape(-1))
        loss_cls = [part.sum() / (1.0 + _FLOAT32_EPS) for part in qfl.reshape(num_imgs, -1).split(counts, dim=1)]

        pos_img, pos_prior = (labels < num_classes).nonzero(as_tuple=True)
        weight = quality[pos_img, pos_prior]
        per_box = giou_loss(decoded[pos_img, pos_prior], targets[pos_img, pos_prior]) * weight
        level_sums = decoded.new_zeros(len(counts)).index_add(0, level_of[pos_prior], per_box)
        loss_bbox = [loss_bbox_weight * (s / (1.0 + _FLOAT32_EPS)) for s in level_sums.unbind(0)]
        if pos_img.numel() == 0:  # keep the graph connected so every rank's backward matches
            loss_bbox = [lb + decoded.sum() * 0 for lb in loss_bbox]

        avg = _mean_over_processes(quality.sum().detach()).clamp(min=1).item()
        return {"loss_cls": [lc / avg for lc in loss_cls], "loss_bbox": [lb / avg for lb in loss_bbox]}


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value
