"""Head outputs -> boxes in original pixels, for the whole batch at once.

Follows MMDetection's `_predict_by_feat_single` for RTMDet: per level, scores above `score_thr`,
their top `nms_pre`; decode with a clamp to the padded canvas; undo the resize; drop empty boxes;
class-aware NMS (IoU > iou_thr suppresses); keep the best `max_per_img`; finally clip to the image
(dropping boxes that lay wholly in the padding).
Images and classes are separated inside one `batched_nms` call by giving every (image, class)
pair its own group id, so there is no Python loop over images, classes or boxes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from model.boxes import distance2bbox
from model.config import TestConfig


@dataclass
class BatchDetections:
    """Flat detections of a batch; `image_index` says which image each row belongs to."""

    boxes: torch.Tensor  # (N, 4) xyxy, original pixels
    scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) int64
    image_index: torch.Tensor  # (N,) int64, sorted ascending; within an image, scores descend

    def split(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        counts = torch.bincount(self.image_index, minlength=batch_size).tolist()
        return list(zip(self.boxes.split(counts), self.scores.split(counts), self.labels.split(counts)))


def _level_candidates(cls: torch.Tensor, score_thr: float, nms_pre: int) -> tuple[torch.Tensor, ...]:
    """(B, C, H, W) logits -> flat (image, prior-in-level, class, score) of the kept candidates."""
    b, c = cls.shape[:2]
    scores = cls.permute(0, 2, 3, 1).reshape(b, -1).sigmoid()
    keep = scores > score_thr
    if nms_pre < scores.shape[1] and bool((keep.sum(1) > nms_pre).any()):
        top, idx = scores.topk(nms_pre, dim=1, sorted=False)
        img = torch.arange(b, device=cls.device)[:, None].expand_as(idx)
        sel = top > score_thr
        img, flat, score = img[sel], idx[sel], top[sel]
    else:
        img, flat = keep.nonzero(as_tuple=True)
        score = scores[img, flat]
    return img, torch.div(flat, c, rounding_mode="floor"), flat % c, score


def postprocess(cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor],
                strides: Sequence[int], scale_wh: torch.Tensor, orig_wh: torch.Tensor,
                cfg: TestConfig) -> BatchDetections:
    """Decode a batch.

    `scale_wh` (B, 2) is resized/original size per image; `orig_wh` (B, 2) the original width and
    height. Both live on the device of the head outputs.
    """
    device = cls_scores[0].device
    imgs, boxes, scores, labels = [], [], [], []
    canvas_h, canvas_w = (cls_scores[0].shape[2] * strides[0], cls_scores[0].shape[3] * strides[0])
    for cls, reg, stride in zip(cls_scores, bbox_preds, strides):
        img, prior, label, score = _level_candidates(cls.float(), cfg.score_thr, cfg.nms_pre)
        w = cls.shape[3]
        points = torch.stack(((prior % w) * stride, torch.div(prior, w, rounding_mode="floor") * stride), -1)
        dist = reg.float().permute(0, 2, 3, 1).reshape(reg.shape[0], -1, 4)[img, prior]
        box = distance2bbox(points.to(dist.dtype), dist)
        box[:, 0::2] = box[:, 0::2].clamp(0, canvas_w)
        box[:, 1::2] = box[:, 1::2].clamp(0, canvas_h)
        imgs.append(img)
        boxes.append(box)
        scores.append(score)
        labels.append(label)
    img = torch.cat(imgs)
    box = torch.cat(boxes) / scale_wh[img].repeat(1, 2)
    score = torch.cat(scores)
    label = torch.cat(labels)
    valid = ((box[:, 2] - box[:, 0]) > 0) & ((box[:, 3] - box[:, 1]) > 0)
    img, box, score, label = img[valid], box[valid], score[valid], label[valid]

    num_classes = cls_scores[0].shape[1]
    keep = batched_nms(box, score, img * num_classes + label, cfg.iou_thr)  # sorted by score, descending
    # Group by image (stable, so scores still descend within each image), then keep each image's best.
    keep = keep[torch.sort(img[keep], stable=True).indices]
    kept_img = img[keep]
    counts = torch.bincount(kept_img, minlength=scale_wh.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=device) - starts[kept_img]
    keep = keep[rank < cfg.max_per_img]

    box = box[keep]
    limit = orig_wh[img[keep]].to(box.dtype)
    box = torch.minimum(box.clamp(min=0), limit.repeat(1, 2))
    # A box that lay wholly in the padding is empty once clipped to the image: not a detection.
    inside = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    keep = keep[inside]
    return BatchDetections(box[inside], score[keep], label[keep], img[keep])
