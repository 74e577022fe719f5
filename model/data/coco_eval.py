"""COCO box mAP: detections per image -> the standard 12 numbers, AP per class and the precision array.

Two interchangeable evaluators: pycocotools (the reference) and faster-coco-eval (the same algorithm in C++,
several times faster on big sets, when installed); `backend="auto"` takes the second when it is there.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model.errors import UserError

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

BACKENDS = ("auto", "pycocotools", "faster-coco-eval")


@dataclass
class CocoEvalResult:
    stats: dict[str, float]  # the 12 numbers by STAT_NAMES
    class_names: list[str]  # in label order
    class_ap: list[float]  # AP@[.5:.95] per class (area all, 100 detections); nan for a class without GT
    class_ap50: list[float]
    # COCOeval's accumulated precision, (IoU thresholds, recall points, classes, areas, max dets), -1 = undefined
    precision: np.ndarray
    recall_points: np.ndarray  # (101,) 0, 0.01, ..., 1
    iou_thresholds: np.ndarray  # (10,) 0.5, 0.55, ..., 0.95
    backend: str


def resolve_backend(backend: str) -> str:
    """'auto' -> faster-coco-eval when installed, else pycocotools; an unavailable choice is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    have_faster = importlib.util.find_spec("faster_coco_eval") is not None
    if backend == "auto":
        return "faster-coco-eval" if have_faster else "pycocotools"
    if backend == "faster-coco-eval" and not have_faster:
        raise UserError("--backend faster-coco-eval: the package is not installed (pip install faster-coco-eval)")
    return backend


def _evaluator_classes(backend: str):
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return COCO, COCOeval


def coco_results(results: Mapping[int, Detections], label_to_cat_id: Sequence[int]) -> list[dict]:
    """Detections in the COCO results format: [{image_id, category_id, bbox [x, y, w, h], score}, ...]."""
    out = []
    for image_id, (boxes, scores, labels) in results.items():
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            out.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return out


def _result_annotations(results: Mapping[int, Detections], label_to_cat_id: Sequence[int]) -> list[dict]:
    # What COCO.loadRes would add to each result: an id, the box area, not crowd.
    return [d | {"id": i + 1, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
            for i, d in enumerate(coco_results(results, label_to_cat_id))]


def evaluate_coco(coco_gt, results: Mapping[int, Detections], label_to_cat_id: Sequence[int] | None = None,
                  image_ids: Sequence[int] | None = None, backend: str = "pycocotools") -> dict[str, float]:
    """COCO bbox evaluation of `results` ({image_id: (boxes xyxy original pixels, scores, labels)}).

    Labels are contiguous; `label_to_cat_id` maps them to category ids (default: categories sorted by id,
    the rule `CocoDetection` uses). Evaluates over `image_ids` (default: every image in `coco_gt`); an image
    without an entry in `results` counts as having no detections. Returns pycocotools' 12 stats by name
    (-1.0 where a category of object size has no ground truth, as pycocotools reports).
    """
    return evaluate_coco_full(coco_gt, results, label_to_cat_id, image_ids, backend).stats


def evaluate_coco_full(coco_gt, results: Mapping[int, Detections], label_to_cat_id: Sequence[int] | None = None,
                       image_ids: Sequence[int] | None = None, backend: str = "pycocotools") -> CocoEvalResult:
    """`evaluate_coco`, keeping the per-class numbers and the precision array (`coco_gt`: a pycocotools COCO)."""
    backend = resolve_backend(backend)
    COCO, COCOeval = _evaluator_classes(backend)
    if label_to_cat_id is None:
        label_to_cat_id = sorted(coco_gt.getCatIds())
    ids = list(image_ids) if image_ids is not None else sorted(coco_gt.getImgIds())
    unknown = set(results) - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results for image ids not in the ground truth: {sorted(unknown)[:10]}")
    gt_data = coco_gt.dataset
    # Build the detections COCO object directly (COCO.loadRes fails on an empty list, and prints).
    dt_data = {"images": list(gt_data["images"]), "categories": list(gt_data["categories"]),
               "annotations": _result_annotations(results, label_to_cat_id)}
    with contextlib.redirect_stdout(io.StringIO()):
        if backend != "pycocotools":  # its own COCO class, with the same dataset
            gt = COCO()
            gt.dataset = gt_data
            gt.createIndex()
            coco_gt = gt
        coco_dt = COCO()
        coco_dt.dataset = dt_data
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = ids
        evaluator.params.catIds = list(label_to_cat_id)  # precision[:, :, k] is then label k
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = np.asarray(evaluator.eval["precision"], np.float64)
    names_by_id = {c["id"]: c["name"] for c in gt_data["categories"]}

    def mean_defined(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    area_all, max_dets_100 = 0, -1
    return CocoEvalResult(
        stats={name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)},
        class_names=[str(names_by_id[c]) for c in label_to_cat_id],
        class_ap=[mean_defined(precision[:, :, k, area_all, max_dets_100]) for k in range(len(label_to_cat_id))],
        class_ap50=[mean_defined(precision[0, :, k, area_all, max_dets_100]) for k in range(len(label_to_cat_id))],
        precision=precision, recall_points=np.asarray(evaluator.params.recThrs, np.float64),
        iou_thresholds=np.asarray(evaluator.params.iouThrs, np.float64), backend=backend)


def format_class_table(result: CocoEvalResult) -> str:
    """Per-class AP and AP50, one class a line, beside the summary table ('-' for a class without GT)."""
    width = max([5, *(len(n) for n in result.class_names)])
    lines = [f" {'class':<{width}}     AP   AP50"]
    for name, ap, ap50 in zip(result.class_names, result.class_ap, result.class_ap50, strict=True):
        cells = ["     -" if np.isnan(v) else f"{v:6.3f}" for v in (ap, ap50)]
        lines.append(f" {name:<{width}} {cells[0]} {cells[1]}")
    return "\n".join(lines)


def format_coco_table(stats: Mapping[str, float]) -> str:
    """The 12-line table pycocotools' `summarize()` prints."""
    lines = []
    for name, (title, short, iou, area, max_dets) in zip(STAT_NAMES, _TABLE_ROWS, strict=True):
        lines.append(f" {title:<18} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{stats[name]:0.3f}")
    return "\n".join(lines)
