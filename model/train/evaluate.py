"""COCO mAP of a network on a COCO-format split, through the official test pipeline.

Letterbox (`model.inference.preprocess`) -> network -> `model.inference.postprocess` with `TestConfig()`
(score 0.001, nms_pre 30000, IoU 0.65, max 300), i.e. the `Detector`, then pycocotools (or faster-coco-eval).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from model.config import TestConfig
from model.data.coco import CocoDetection
from model.data.coco_eval import CocoEvalResult, evaluate_coco_full
from model.inference.detector import Detector


def find_split(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(instances JSON, image folder) of `split` in a COCO-style folder.

    Accepts `annotations/instances_<split>.json` + `<split>/` (the shapes set) and the COCO 2017 names
    `annotations/instances_<split>2017.json` + `<split>2017/`.
    """
    root = Path(data_dir)
    for name in (split, f"{split}2017"):
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            img_dir = root / name
            if not img_dir.is_dir():
                raise FileNotFoundError(f"{ann} found but its image folder {img_dir} is missing")
            return ann, img_dir
    raise FileNotFoundError(f"{root}: no annotations/instances_{split}.json (or instances_{split}2017.json)")


@torch.no_grad()
def predict_dataset(detector: Detector, dataset: CocoDetection, batch_size: int = 8,
                    max_images: int | None = None, progress: bool | None = False) -> dict[int, tuple]:
    """{image_id: (boxes xyxy original pixels, scores, labels)} for the first `max_images` images; with
    `progress`, a bar on stderr (stdout stays for the results); None: only when stderr is a terminal (a log
    file or pipe gets no bar, and an error is still the only line there)."""
    from tqdm import tqdm

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    results: dict[int, tuple] = {}
    disable = None if progress is None else not progress
    with tqdm(total=n, desc="eval", unit="img", file=sys.stderr, dynamic_ncols=True, disable=disable) as bar:
        for start in range(0, n, batch_size):
            samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
            for sample, det in zip(samples, detector([s.img for s in samples]), strict=True):
                results[sample.image_id] = (det.boxes, det.scores, det.labels)
            bar.update(len(samples))
    return results


def evaluate_model_full(model: nn.Module, dataset: CocoDetection, img_size: int = 640,
                        device: str | torch.device | None = None, batch_size: int = 8,
                        max_images: int | None = None, backend: str = "pycocotools",
                        progress: bool | None = False, accelerate: str | None = None,
                        calibration=None, canvas: str = "square") -> tuple[CocoEvalResult, dict[int, tuple]]:
    """COCO evaluation of `model` (left untouched: the detector works on a fused copy) and its detections;
    `accelerate` / `calibration`: how the network runs (the Detector's arguments), e.g. a reduced-precision
    runner whose accuracy cost is being measured; `canvas`: the letterbox's (TestConfig.canvas)."""
    detector = Detector(model, class_names=dataset.class_names, device=device,
                        test_cfg=TestConfig(input_size=img_size, canvas=canvas),
                        fuse=True, accelerate=accelerate, calibration=calibration)
    results = predict_dataset(detector, dataset, batch_size, max_images, progress)
    return evaluate_coco_full(dataset.coco, results, dataset.label_to_cat_id, list(results), backend), results


def evaluate_model(model: nn.Module, dataset: CocoDetection, img_size: int = 640,
                   device: str | torch.device | None = None, batch_size: int = 8,
                   max_images: int | None = None) -> dict[str, float]:
    """The 12 COCO numbers of `model`."""
    return evaluate_model_full(model, dataset, img_size, device, batch_size, max_images)[0].stats


def save_results_json(path: str | Path, detections: dict[int, tuple], label_to_cat_id: list[int]) -> None:
    """The detections as a COCO results file (what COCO.loadRes reads), written atomically."""
    import json

    from model.data.coco_eval import coco_results
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(coco_results(detections, label_to_cat_id)))
    tmp.replace(path)
