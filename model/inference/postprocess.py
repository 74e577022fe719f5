"""Network outputs -> boxes in original pixels, for the whole batch at once.

Follows MMDetection's `_predict_by_feat_single` for RTMDet: per level, scores above `score_thr`,
their top `nms_pre`; decode with a clamp to the padded canvas; undo the resize; drop empty boxes;
class-aware NMS (IoU > iou_thr suppresses); keep the best `max_per_img`; finally clip to the image
(dropping boxes that lay wholly in the padding).
Images and classes are separated inside one `batched_nms` call by giving every (image, class)
pair its own group id, so there is no Python loop over images, classes or boxes.

Three kinds of network output reach the same `finish` (one NMS path for every engine):
head maps (`head_candidates`), boxes already decoded on the canvas (`decoded_candidates`, an
`rtmdet export --decode` file) and end-to-end detections with NMS inside (`end_to_end_candidates`).
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


@dataclass
class Candidates:
    """Flat candidate boxes of a batch on the letterboxed canvas, before rescaling and NMS."""

    image_index: torch.Tensor  # (N,) int64
    boxes: torch.Tensor  # (N, 4) xyxy, canvas pixels
    scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) int64
    num_classes: int


def _top_candidates(scores: torch.Tensor, score_thr: float, nms_pre: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """(B, K) probabilities -> flat (image, column, score) above `score_thr`, at most `nms_pre` per image."""
    b = scores.shape[0]
    keep = scores > score_thr
    if nms_pre < scores.shape[1] and bool((keep.sum(1) > nms_pre).any()):
        top, idx = scores.topk(nms_pre, dim=1, sorted=False)
        img = torch.arange(b, device=scores.device)[:, None].expand_as(idx)
        sel = top > score_thr
        return img[sel], idx[sel], top[sel]
    img, flat = keep.nonzero(as_tuple=True)
    return img, flat, scores[img, flat]


def head_candidates(cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor],
                    strides: Sequence[int], cfg: TestConfig) -> Candidates:
    """Per-level head maps (B, C, H, W) logits and (B, 4, H, W) distances -> decoded candidates."""
    imgs, boxes, scores, labels = [], [], [], []
    canvas_h, canvas_w = (cls_scores[0].shape[2] * strides[0], cls_scores[0].shape[3] * strides[0])
    num_classes = cls_scores[0].shape[1]
    for cls, reg, stride in zip(cls_scores, bbox_preds, strides):
        b, c = cls.shape[:2]
        probs = cls.float().permute(0, 2, 3, 1).reshape(b, -1).sigmoid()
        img, flat, score = _top_candidates(probs, cfg.score_thr, cfg.nms_pre)
        prior, label = torch.div(flat, c, rounding_mode="floor"), flat % c
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
    return Candidates(torch.cat(imgs), torch.cat(boxes), torch.cat(scores), torch.cat(labels), num_classes)


def decoded_candidates(boxes: torch.Tensor, scores: torch.Tensor, cfg: TestConfig) -> Candidates:
    """(B, N, 4) canvas boxes and (B, N, C) probabilities (all levels together) -> candidates; the top
    `nms_pre` are taken over all priors of an image (the graph has already merged the levels)."""
    b, n, c = scores.shape
    img, flat, score = _top_candidates(scores.float().reshape(b, n * c), cfg.score_thr, cfg.nms_pre)
    prior = torch.div(flat, c, rounding_mode="floor")
    return Candidates(img, boxes.float()[img, prior], score, flat % c, c)


def end_to_end_candidates(dets: torch.Tensor, labels: torch.Tensor, cfg: TestConfig,
                          num_classes: int) -> Candidates:
    """(B, K, 5) x1, y1, x2, y2, score on the canvas and (B, K) labels, NMS already applied -> candidates."""
    score = dets[..., 4].float()
    img, k = (score > cfg.score_thr).nonzero(as_tuple=True)
    return Candidates(img, dets[img, k, :4].float(), score[img, k], labels[img, k].long(), num_classes)


def finish(cand: Candidates, scale_wh: torch.Tensor, orig_wh: torch.Tensor, cfg: TestConfig,
           nms: bool = True) -> BatchDetections:
    """Undo the resize, drop empty boxes, class-aware NMS per image (unless the network did it), keep each
    image's best `max_per_img`, clip to the image. `scale_wh` (B, 2) is resized/original size per image,
    `orig_wh` (B, 2) the original width and height."""
    device = cand.boxes.device
    img = cand.image_index
    box = cand.boxes / scale_wh.to(device)[img].repeat(1, 2)
    score, label = cand.scores, cand.labels
    valid = ((box[:, 2] - box[:, 0]) > 0) & ((box[:, 3] - box[:, 1]) > 0)
    img, box, score, label = img[valid], box[valid], score[valid], label[valid]

    if nms:
        keep = batched_nms(box, score, img * cand.num_classes + label, cfg.iou_thr)  # by score, descending
    else:
        keep = torch.sort(score, descending=True, stable=True).indices
    # Group by image (stable, so scores still descend within each image), then keep each image's best.
    keep = keep[torch.sort(img[keep], stable=True).indices]
    kept_img = img[keep]
    counts = torch.bincount(kept_img, minlength=scale_wh.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=device) - starts[kept_img]
    keep = keep[rank < cfg.max_per_img]

    box = box[keep]
    limit = orig_wh.to(device)[img[keep]].to(box.dtype)
    box = torch.minimum(box.clamp(min=0), limit.repeat(1, 2))
    # A box that lay wholly in the padding is empty once clipped to the image: not a detection.
    inside = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    keep = keep[inside]
    return BatchDetections(box[inside], score[keep], label[keep], img[keep])


def postprocess(cls_scores: Sequence[torch.Tensor], bbox_preds: Sequence[torch.Tensor],
                strides: Sequence[int], scale_wh: torch.Tensor, orig_wh: torch.Tensor,
                cfg: TestConfig) -> BatchDetections:
    """Decode a batch of head maps. `scale_wh`, `orig_wh`: see `finish`."""
    return finish(head_candidates(cls_scores, bbox_preds, strides, cfg), scale_wh, orig_wh, cfg)
