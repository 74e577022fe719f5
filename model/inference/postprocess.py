"""Network outputs -> boxes in original pixels, for the whole batch at once.

Follows MMDetection's `_predict_by_feat_single` for RTMDet: per level, scores above `score_thr`,
their top `nms_pre`; decode with a clamp to the padded canvas; undo the resize; drop empty boxes;
class-aware NMS (IoU > iou_thr suppresses); keep the best `max_per_img`; finally clip to the image
(dropping boxes that lay wholly in the padding).
Images and classes are separated by giving every (image, class) pair its own group id. NMS keeps only
each image's best `max_per_img` (see `nms_top`): on the CPU, with many candidates, it runs on a growing
prefix of each image's candidates by score, which decides the same boxes as NMS over all of them.

Three kinds of network output reach the same `finish` (one NMS path for every engine):
head maps (`head_candidates`; its box distances dense, or computed at the candidates alone), boxes already
decoded on the canvas (`decoded_candidates`, an
`rtmdet export --decode` file) and end-to-end detections with NMS inside (`end_to_end_candidates`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.boxes import distance2bbox
from model.config import TestConfig
from model.inference.nms import batched_nms
from model.inference.sparse_regression import DistancesAt, dense_distances


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


def head_candidates(cls_scores: Sequence[torch.Tensor], distances_at: DistancesAt,
                    strides: Sequence[int], cfg: TestConfig) -> Candidates:
    """Per-level (B, C, H, W) logits, and the distances at chosen points (`dense_distances` of the (B, 4, H, W)
    maps, or `sparse_distances`: computed there only) -> decoded candidates. The candidates are chosen from
    the scores alone, so the box branch is asked for their points only."""
    imgs, boxes, scores, labels = [], [], [], []
    canvas_h, canvas_w = (cls_scores[0].shape[2] * strides[0], cls_scores[0].shape[3] * strides[0])
    num_classes = cls_scores[0].shape[1]
    for level, (cls, stride) in enumerate(zip(cls_scores, strides)):
        b, c = cls.shape[:2]
        probs = cls.float().permute(0, 2, 3, 1).reshape(b, -1).sigmoid()
        img, flat, score = _top_candidates(probs, cfg.score_thr, cfg.nms_pre)
        prior, label = torch.div(flat, c, rounding_mode="floor"), flat % c
        w = cls.shape[3]
        points = torch.stack(((prior % w) * stride, torch.div(prior, w, rounding_mode="floor") * stride), -1)
        dist = distances_at(level, img, prior)
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


# At most this many candidates go to one `batched_nms` call over the whole batch (torchvision's own limit
# for its single-call path on the CPU); above it, NMS runs per image on a prefix (`nms_top`).
ONE_CALL_MAX = 1000
PREFIX_MIN = 64  # the smallest prefix tried per image


def best_per_image(keep: torch.Tensor, img: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """`keep` (indices by descending score) grouped by image, stably, and cut to each image's cap."""
    keep = keep[torch.sort(img[keep], stable=True).indices]
    kept_img = img[keep]
    counts = torch.bincount(kept_img, minlength=caps.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - starts[kept_img]
    return keep[rank < caps[kept_img]]


def nms_top(box: torch.Tensor, score: torch.Tensor, img: torch.Tensor, label: torch.Tensor, num_classes: int,
            iou_thr: float, caps: torch.Tensor) -> torch.Tensor:
    """Class-aware NMS per image, keeping image i's best `caps[i]`: indices grouped by image, scores
    descending within each.

    Greedy NMS decides a box by the boxes that score higher only, so NMS over an image's best m candidates
    decides those m exactly as NMS over all of them would; once it keeps `caps[i]` of them, the rest cannot
    enter the answer. With many candidates this is what saves the time: torchvision's batched NMS over
    more than 1000 boxes loops over every (image, class) group, each at O(n^2) (at 320, batch 8, 2 threads,
    1000 candidates an image in 400 groups: 92 ms, where the prefixes take 6 ms; at the evaluation
    thresholds and 640: 5.3 s for the shipped model's batch of 8, then 0.13 s). Boxes of exactly equal
    score may be kept in another order than with one call (torchvision's order among ties is unspecified
    either way). On CUDA, and with few candidates, one `batched_nms` call does it (no per-image host
    synchronisation)."""
    caps = caps.to(device=box.device, dtype=torch.long)
    if box.device.type != "cpu" or box.shape[0] <= ONE_CALL_MAX:
        return best_per_image(batched_nms(box, score, img * num_classes + label, iou_thr), img, caps)
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(img[order], stable=True).indices]  # by image, best first within each
    counts = torch.bincount(img, minlength=caps.shape[0]).tolist()
    pieces, start = [], 0
    for n, cap in zip(counts, caps.tolist()):
        mine, start = order[start:start + n], start + n
        if n == 0 or cap <= 0:
            continue
        m = min(n, max(2 * cap, PREFIX_MIN))
        while True:
            prefix = mine[:m]
            kept = batched_nms(box[prefix], score[prefix], label[prefix], iou_thr)  # by score, descending
            if kept.numel() >= cap or m == n:
                break
            m = min(n, 4 * m)
        pieces.append(prefix[kept[:cap]])
    return torch.cat(pieces) if pieces else order[:0]


def finish(cand: Candidates, scale_wh: torch.Tensor, orig_wh: torch.Tensor, cfg: TestConfig,
           nms: bool = True, caps: torch.Tensor | None = None) -> BatchDetections:
    """Undo the resize, drop empty boxes, class-aware NMS per image (unless the network did it), keep each
    image's best `max_per_img` (or `caps[i]` for image i), clip to the image. `scale_wh` (B, 2) is
    resized/original size per image, `orig_wh` (B, 2) the original width and height."""
    device = cand.boxes.device
    if caps is None:
        caps = torch.full((scale_wh.shape[0],), cfg.max_per_img, dtype=torch.long)
    caps = caps.to(device)
    img = cand.image_index
    box = cand.boxes / scale_wh.to(device)[img].repeat(1, 2)
    score, label = cand.scores, cand.labels
    valid = ((box[:, 2] - box[:, 0]) > 0) & ((box[:, 3] - box[:, 1]) > 0)
    img, box, score, label = img[valid], box[valid], score[valid], label[valid]

    if nms:
        keep = nms_top(box, score, img, label, cand.num_classes, cfg.iou_thr, caps)
    else:
        keep = best_per_image(torch.sort(score, descending=True, stable=True).indices, img, caps)

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
    return finish(head_candidates(cls_scores, dense_distances(bbox_preds), strides, cfg), scale_wh, orig_wh, cfg)
