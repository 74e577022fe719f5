"""evaluate_coco on hand-made cases whose COCO numbers can be worked out by hand."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from model.data.coco_eval import (
    STAT_NAMES,
    coco_results,
    evaluate_coco,
    evaluate_coco_full,
    format_class_table,
    format_coco_table,
    resolve_backend,
)

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


def test_per_class_ap_beside_the_summary():
    half = evaluate_coco_full(_coco_gt(), {1: _perfect()[1]})
    assert half.class_names == ["a", "b"]  # label order: category ids 4, 9
    assert half.class_ap == pytest.approx([51 / 101, 51 / 101]) and half.class_ap50 == pytest.approx([51 / 101] * 2)
    # Only class b's detections: a scores 0 (it has GT), b 1.
    only_b = {i: (b[lab == 1], s[lab == 1], lab[lab == 1]) for i, (b, s, lab) in _perfect().items()}
    result = evaluate_coco_full(_coco_gt(), only_b)
    assert result.class_ap == pytest.approx([0.0, 1.0])
    assert result.stats["AP"] == pytest.approx(np.mean(result.class_ap))  # the summary is the class mean
    assert result.precision.shape == (10, 101, 2, 4, 3)
    table = format_class_table(result).splitlines()
    assert table == [" class     AP   AP50", " a      0.000  0.000", " b      1.000  1.000"]


def test_class_without_ground_truth_is_nan_not_zero():
    coco = _coco_gt()
    coco.dataset["categories"].append({"id": 12, "name": "never"})
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    result = evaluate_coco_full(coco, _perfect(), label_to_cat_id=[4, 9, 12])
    assert result.class_ap[:2] == pytest.approx([1.0, 1.0]) and np.isnan(result.class_ap[2])
    assert result.stats["AP"] == pytest.approx(1.0)  # pycocotools leaves the class out of the mean
    assert format_class_table(result).splitlines()[-1] == " never      -      -"


def _random_case(seed: int, n_images: int = 25, n_classes: int = 4):
    """GT of mixed sizes (small to large) and detections near them, with misses, false positives and label
    mistakes, so that every area range and a real precision-recall trade-off are exercised."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], {}
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480})
        n = int(rng.integers(0, 8))
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([640, 480]) - wh)
        labels = rng.integers(0, n_classes, n)
        for (x, y), (w, h), lab in zip(xy, wh, labels, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(lab) * 3 + 1,
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                         "iscrowd": int(rng.random() < 0.05)})
        keep = rng.random(n) < 0.8
        boxes = np.concatenate([xy, xy + wh], 1)[keep] + rng.normal(0, 4, (int(keep.sum()), 4))
        det_labels = np.where(rng.random(int(keep.sum())) < 0.9, labels[keep], rng.integers(0, n_classes,
                                                                                             int(keep.sum())))
        fp = rng.uniform(0, 400, (int(rng.integers(0, 5)), 2))
        boxes = np.concatenate([boxes, np.concatenate([fp, fp + rng.uniform(10, 200, fp.shape)], 1)])
        det_labels = np.concatenate([det_labels, rng.integers(0, n_classes, len(fp))])
        results[image_id] = (boxes.astype(np.float32), rng.random(len(boxes)).astype(np.float32), det_labels)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k * 3 + 1, "name": f"c{k}"} for k in range(n_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_gives_the_pycocotools_numbers(seed):
    coco, results = _random_case(seed)
    ref = evaluate_coco_full(coco, results, backend="pycocotools")
    fast = evaluate_coco_full(coco, results, backend="faster-coco-eval")
    assert ref.backend == "pycocotools" and fast.backend == "faster-coco-eval"
    assert 0.05 < ref.stats["AP"] < 0.95  # a real trade-off, not a trivial 0 or 1
    for name in STAT_NAMES:
        assert fast.stats[name] == pytest.approx(ref.stats[name], abs=1e-12), name
    np.testing.assert_allclose(fast.precision, ref.precision, atol=1e-12)
    np.testing.assert_allclose(fast.class_ap, ref.class_ap, atol=1e-12)


def test_backend_choice():
    assert resolve_backend("auto") == "faster-coco-eval"  # installed with the dev extra
    assert resolve_backend("pycocotools") == "pycocotools"
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        resolve_backend("detectron")


def test_backend_without_faster_coco_eval_installed(monkeypatch):
    import importlib.util

    from model.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faster_coco_eval" else
                        real(name, *a))
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(UserError, match="not installed"):
        resolve_backend("faster-coco-eval")


def test_results_file_is_what_pycocotools_loads():
    from pycocotools.cocoeval import COCOeval

    coco, results = _random_case(3)
    dets = coco_results(results, sorted(coco.getCatIds()))
    assert {tuple(sorted(d)) for d in dets} == {("bbox", "category_id", "image_id", "score")}
    x1, y1, x2, y2 = results[1][0][0].tolist()
    assert dets[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])  # xywh
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ours = evaluate_coco(coco, results)
    assert [ours[n] for n in STAT_NAMES] == pytest.approx(list(evaluator.stats), abs=1e-12)
