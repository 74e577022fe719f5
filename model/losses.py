"""Training losses of RTMDet: Quality Focal Loss on IoU-quality targets and GIoU on decoded boxes.

Both follow MMDetection's arithmetic exactly (box areas are *not* clamped, the union and the enclosing
area are floored at `eps`), because `RTMDetSepBNHead.loss` promises MMDetection's numbers and
gradients, and tiny/s predict linear distances that can give inverted boxes early in training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _area(boxes: torch.Tensor) -> torch.Tensor:
    # Deliberately signed: MMDetection's bbox_overlaps does not clamp widths or heights here.
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou_pairwise(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, 4) x (M, 4) -> (N, M) IoU, computed as MMDetection's `BboxOverlaps2D` does."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (_area(a)[:, None] + _area(b)[None, :] - overlap).clamp(min=eps)
    return overlap / union


def aligned_giou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, 4), (N, 4) -> (N,) generalised IoU of row i with row i."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (_area(pred) + _area(target) - overlap).clamp(min=eps)
    enclose_wh = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return overlap / union - (enclose - union) / enclose


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> float32 (pixel areas overflow fp16, and AMP's half outputs lose the loss); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N,) 1 - GIoU, computed in float32 at least (fp16 overflows on pixel areas)."""
    return 1.0 - aligned_giou(at_least_float32(pred), at_least_float32(target), eps)


def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                       beta: float = 2.0) -> torch.Tensor:
    """(N, C) logits, (N,) labels (C = background), (N,) IoU targets -> (N,) loss summed over classes.

    QFL(sigma) = -|y - sigma|^beta * ((1-y) log(1-sigma) + y log(sigma)), with y = IoU at the positive's
    own class and 0 everywhere else.
    """
    logits = at_least_float32(logits)
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    num_classes = logits.shape[1]
    pos = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    if pos.numel():
        cls = labels[pos].long()
        x = logits[pos, cls]
        y = quality[pos].to(x.dtype)
        pos_loss = F.binary_cross_entropy_with_logits(x, y, reduction="none") * (y - prob[pos, cls]).abs().pow(beta)
        loss = loss.index_put((pos, cls), pos_loss)
    return loss.sum(dim=1)
