"""Dynamic Soft Label Assigner: which priors of one image learn which ground-truth box.

Cost of prior p for GT g (only priors whose point lies strictly inside at least one GT compete):
  soft classification cost  sum_c BCE(x_c, y_c) * |y_c - sigmoid(x_c)|^2, y = one-hot(label_g) * IoU(p, g)
  IoU cost                  -log(IoU(p, g) + 1e-7) * iou_weight
  soft centre prior         10 ** (|centre_g - point_p| / stride_p - soft_center_radius)
Each GT takes its `k = max(1, int(sum of its top-`topk` IoUs))` cheapest priors; a prior taken by several
GTs keeps the one with the lowest cost. Everything is batched over GTs; the caller loops over images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.losses import at_least_float32, box_iou_pairwise

_IOU_EPS = 1e-7


@dataclass
class AssignResult:
    """Per prior: matched GT index (-1 = background) and the IoU of its prediction with that GT (0 if none)."""

    gt_index: torch.Tensor  # (P,) int64
    iou: torch.Tensor  # (P,) float

    @property
    def positive(self) -> torch.Tensor:
        return self.gt_index >= 0


@dataclass(frozen=True)
class DynamicSoftLabelAssigner:
    soft_center_radius: float = 3.0
    topk: int = 13
    iou_weight: float = 3.0

    @torch.no_grad()
    def assign(self, priors: torch.Tensor, logits: torch.Tensor, boxes: torch.Tensor,
               gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> AssignResult:
        """priors (P, 4) = (x, y, stride, stride); logits (P, C) raw; boxes (P, 4) decoded predictions;
        gt_boxes (G, 4) xyxy; gt_labels (G,)."""
        num_priors = priors.shape[0]
        gt_index = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
        logits, boxes = at_least_float32(logits), at_least_float32(boxes)
        gt_boxes = gt_boxes.to(boxes.dtype)
        iou_out = torch.zeros(num_priors, dtype=boxes.dtype, device=priors.device)
        if gt_boxes.shape[0] == 0 or num_priors == 0:
            return AssignResult(gt_index, iou_out)

        points = priors[:, :2]
        deltas = torch.cat((points[:, None] - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - points[:, None]), -1)
        valid = (deltas.amin(dim=-1) > 0).any(dim=1)
        valid_idx = valid.nonzero().squeeze(1)
        if valid_idx.numel() == 0:
            return AssignResult(gt_index, iou_out)

        v_priors, v_logits, v_boxes = priors[valid_idx], logits[valid_idx], boxes[valid_idx]
        gt_centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2.0
        distance = (v_priors[:, None, :2] - gt_centre[None]).pow(2).sum(-1).sqrt() / v_priors[:, 2:3]
        center_cost = torch.pow(10, distance - self.soft_center_radius)

        ious = box_iou_pairwise(v_boxes, gt_boxes)  # (V, G)
        iou_cost = -torch.log(ious + _IOU_EPS) * self.iou_weight

        # The soft label is zero except at the GT's class, so the (V, G, C) cost splits into a per-prior
        # all-negative sum plus a correction at one class per GT: memory (V, G) instead of (V, G, C).
        prob = v_logits.sigmoid()
        neg_cost = F.binary_cross_entropy_with_logits(v_logits, torch.zeros_like(v_logits),
                                                      reduction="none") * prob.pow(2)
        labels = gt_labels.long()
        x = v_logits[:, labels]  # (V, G)
        p = prob[:, labels]
        pos_cost = F.binary_cross_entropy_with_logits(x, ious, reduction="none") * (ious - p).abs().pow(2)
        cls_cost = neg_cost.sum(1, keepdim=True) - neg_cost[:, labels] + pos_cost

        cost = cls_cost + iou_cost + center_cost
        matched_gt, matched_iou, fg = self._dynamic_k_matching(cost, ious)
        fg_idx = valid_idx[fg]
        gt_index[fg_idx] = matched_gt
        iou_out[fg_idx] = matched_iou
        return AssignResult(gt_index, iou_out)

    def _dynamic_k_matching(self, cost: torch.Tensor, ious: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_valid, num_gt = cost.shape
        top_ious = ious.topk(min(self.topk, num_valid), dim=0).values
        ks = top_ious.sum(0).int().clamp(min=1)  # int() truncates, as the official assigner does
        k_max = int(ks.max())
        order = cost.topk(k_max, dim=0, largest=False).indices  # (k_max, G)
        take = torch.arange(k_max, device=cost.device)[:, None] < ks[None, :]
        matching = torch.zeros_like(cost, dtype=torch.bool)
        matching[order[take], torch.arange(num_gt, device=cost.device).expand(k_max, num_gt)[take]] = True

        multi = matching.sum(1) > 1
        if bool(multi.any()):
            cheapest = cost[multi].argmin(dim=1)
            rows = matching[multi]
            rows.zero_()
            rows[torch.arange(rows.shape[0], device=cost.device), cheapest] = True
            matching[multi] = rows
        fg = matching.any(dim=1)
        matched_gt = matching[fg].int().argmax(dim=1)
        matched_iou = (matching * ious).sum(1)[fg]
        return matched_gt, matched_iou, fg
