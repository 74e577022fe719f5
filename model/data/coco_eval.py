"""COCO box mAP with pycocotools: detections per image -> the standard 12 numbers."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# The lines COCOeval.summarize() prints, in `stats` order.
_TABLE_ROWS = (
    ("Average Precision", "(AP)", "0.50:0.95", "all", 100),
    ("Average Precision", "(AP)", "0.50", "all", 100),
    ("Average Precision", "(AP)", "0.75", "all", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "small", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "medium", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "large", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 1),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 10),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "small", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "medium", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "large", 100),
)

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N,4) xyxy, scores (N,), labels (N,) contiguous


def _result_annotations(results: Mapping[int, Detections], label_to_cat_id: Sequence[int]) -> list[dict]:
    anns = []
    for image_id, (boxes, scores, labels) in results.items():
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": int(label_to_cat_id[label]),
                         "bbox": [x1, y1, w, h], "area": w * h, "score": score, "iscrowd": 0})
    return anns


def evaluate_coco(coco_gt, results: Mapping[int, Detections], label_to_cat_id: Sequence[int] | None = None,
                  image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO bbox evaluation of `results` ({image_id: (boxes xyxy original pixels, scores, labels)}).

    Labels are contiguous; `label_to_cat_id` maps them to category ids (default: categories sorted by id,
    the rule `CocoDetection` uses). Evaluates over `image_ids` (default: every image in `coco_gt`); an image
    without an entry in `results` counts as having no detections. Returns pycocotools' 12 stats by name
    (-1.0 where a category of object size has no ground truth, as pycocotools reports).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if label_to_cat_id is None:
        label_to_cat_id = sorted(coco_gt.getCatIds())
    ids = list(image_ids) if image_ids is not None else sorted(coco_gt.getImgIds())
    unknown = set(results) - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results for image ids not in the ground truth: {sorted(unknown)[:10]}")
    # Build the detections COCO object directly (COCO.loadRes fails on an empty list, and prints).
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": _result_annotations(results, label_to_cat_id)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}


def format_coco_table(stats: Mapping[str, float]) -> str:
    """The 12-line table pycocotools' `summarize()` prints."""
    lines = []
    for name, (title, short, iou, area, max_dets) in zip(STAT_NAMES, _TABLE_ROWS, strict=True):
        lines.append(f" {title:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{stats[name]:0.3f}")
    return "\n".join(lines)
