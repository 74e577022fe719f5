"""evaluate_coco on hand-made cases whose COCO numbers can be worked out by hand."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from model.data.coco_eval import STAT_NAMES, evaluate_coco, format_coco_table

# Two images; category ids 4 and 9 map to labels 0 and 1. All boxes are "medium" (32^2 < area < 96^2) except
# the small one on image 2.
GT_BOXES = {1: ([[10, 10, 60, 60], [100, 20, 150, 90]], [0, 1]), 2: ([[30, 40, 80, 100], [5, 5, 20, 20]], [1, 0])}


def _coco_gt() -> COCO:
    anns, ann_id = [], 1
    for image_id, (boxes, labels) in GT_BOXES.items():
        for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
            anns.append({"id": ann_id, "image_id": image_id, "category_id": [4, 9][label], "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
            ann_id += 1
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 200, "height": 120}, {"id": 2, "width": 200, "height": 120}],
                    "categories": [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _perfect():
    return {i: (np.array(b, np.float32), np.full(len(b), 0.9, np.float32), np.array(lab)) for i, (b, lab)
            in GT_BOXES.items()}


def test_perfect_detections_score_one():
    stats = evaluate_coco(_coco_gt(), _perfect())
    assert list(stats) == list(STAT_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "AR10", "AR100", "ARs", "ARm"):
        assert stats[name] == pytest.approx(1.0), name
    assert stats["APl"] == -1.0  # no large objects: pycocotools reports -1


def test_no_detections_score_zero():
    stats = evaluate_coco(_coco_gt(), {})
    assert stats["AP"] == 0.0 and stats["AP50"] == 0.0 and stats["AR100"] == 0.0


def test_wrong_labels_score_zero():
    res = {i: (b, s, 1 - lab) for i, (b, s, lab) in _perfect().items()}
    assert evaluate_coco(_coco_gt(), res)["AP"] == 0.0


def test_box_with_iou_0_54_counts_at_50_only():
    # Every detection shifted sideways by 0.3 of its width: IoU = 0.7 / 1.3 = 0.538.
    res = {}
    for i, (b, s, lab) in _perfect().items():
        w = b[:, 2] - b[:, 0]
        shift = (0.3 * w).astype(np.float32)
        res[i] = (b + np.stack([shift, 0 * shift, shift, 0 * shift], 1), s, lab)
    stats = evaluate_coco(_coco_gt(), res)
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == 0.0
    # Matched at IoU threshold 0.50 only: 1 of the 10 thresholds.
    assert stats["AP"] == pytest.approx(0.1)


def test_half_the_objects_found():
    # Only image 1's detections: recall 0.5 for each class, precision 1.
    res = {1: _perfect()[1]}
    stats = evaluate_coco(_coco_gt(), res)
    assert stats["AR100"] == pytest.approx(0.5)
    # 101-point interpolated AP with recall reaching 0.5 at precision 1: 51/101 per class.
    assert stats["AP"] == pytest.approx(51 / 101)


def test_results_for_unknown_images_are_rejected():
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(_coco_gt(), {77: _perfect()[1]})


def test_table_has_the_twelve_pycocotools_lines():  # AR1 is 1: one object per class per image
    table = format_coco_table(evaluate_coco(_coco_gt(), _perfect()))
    lines = table.splitlines()
    assert len(lines) == 12
    assert lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
    assert lines[5] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000"
    assert lines[6] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 1.000"
