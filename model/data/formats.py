"""Which dataset layout a folder holds (COCO, YOLO, Pascal VOC), one split of it as a `CocoDetection`, and the
conversion of a YOLO or VOC set to a COCO copy that `rtmdet train --data` reads like any COCO set.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from model.data.coco import CocoDetection
from model.data.instances import FORMATS, SplitInstances
from model.data.voc import available_splits as voc_splits
from model.data.voc import is_voc_root, read_voc_split
from model.data.yolo import find_data_yaml, read_data_yaml, read_yolo_split
from model.errors import dataset_errors


def detect_format(data: str | os.PathLike) -> str:
    """`coco`, `yolo` or `voc` from what `data` (a folder, or a YOLO yaml file) holds."""
    path = Path(data)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return "yolo"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such dataset folder")
    if (path / "annotations").is_dir() and any((path / "annotations").glob("instances_*.json")):
        return "coco"
    if find_data_yaml(path) is not None:
        return "yolo"
    if is_voc_root(path):
        return "voc"
    raise ValueError(f"{path}: not a dataset layout this reads: want annotations/instances_<split>.json (COCO), "
                     f"a data.yaml (YOLO), or Annotations/ + ImageSets/Main/ (Pascal VOC, e.g. VOCdevkit/VOC2012)")


def _yaml_of(data: Path) -> Path:
    if data.is_file():
        return data
    found = find_data_yaml(data)
    if found is None:
        raise FileNotFoundError(f"{data}: no data.yaml (or single *.yaml) for a YOLO set")
    return found


def _resolve(data: str | os.PathLike, fmt: str) -> tuple[Path, str]:
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown dataset format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    return Path(data), detect_format(data) if fmt == "auto" else fmt


def read_split(data: str | os.PathLike, split: str, fmt: str = "auto") -> SplitInstances:
    """A YOLO or VOC split as a COCO instances dict (FileNotFoundError if the set has no such split)."""
    path, fmt = _resolve(data, fmt)
    if fmt == "yolo":
        return read_yolo_split(_yaml_of(path), split)
    if fmt == "voc":
        if not is_voc_root(path):
            raise FileNotFoundError(f"{path}: no Annotations/ and ImageSets/Main/ (a Pascal VOC root)")
        return read_voc_split(path, split)
    raise ValueError(f"{path}: read_split is for YOLO and VOC sets; COCO files are read as they are")


@dataset_errors
def open_split(data: str | os.PathLike, split: str, fmt: str = "auto", training: bool = False) -> CocoDetection:
    """`split` of the dataset at `data` as a `CocoDetection`; FileNotFoundError if it has no such split.

    COCO training splits drop images without boxes (MMDetection's `filter_empty_gt`); YOLO and VOC sets keep them
    as negatives in every split, as Ultralytics does: in those formats an image without labels is deliberate."""
    path, fmt = _resolve(data, fmt)
    if fmt == "coco":
        from model.train.evaluate import find_split

        ann, img_dir = find_split(path, split)
        return CocoDetection(ann, img_dir, filter_empty=training)
    found = read_split(path, split, fmt)
    return CocoDetection(found.source, found.img_dir, filter_empty=False, data=found.instances)


@dataset_errors
def splits_of(data: str | os.PathLike, fmt: str = "auto") -> list[str]:
    path, fmt = _resolve(data, fmt)
    if fmt == "yolo":
        return list(read_data_yaml(_yaml_of(path)).splits)
    if fmt == "voc":
        return voc_splits(path)
    return sorted(p.stem[len("instances_"):] for p in (path / "annotations").glob("instances_*.json"))


@dataset_errors
def convert_to_coco(src: str | os.PathLike, out: str | os.PathLike, fmt: str = "auto",
                    link: bool = False) -> dict[str, Path]:
    """Write every split of a YOLO or VOC set as `out/annotations/instances_<split>.json` + `out/<split>/`
    (images copied, or hard-linked with `link`). Returns {split: annotation file}. Every split is read (and so
    checked) before anything is written; the annotation files are written last, so an interrupted conversion
    leaves no annotation file pointing at missing images."""
    path, fmt = _resolve(src, fmt)
    if fmt == "coco":
        raise ValueError(f"{path} is already a COCO set")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; convert into a new folder")
    splits = {split: read_split(path, split, fmt) for split in splits_of(path, fmt)}
    if not splits:
        raise ValueError(f"{path}: no train/val/test split to convert")
    written = {}
    for split, found in splits.items():
        for image in found.instances["images"]:
            dest = out / split / image["file_name"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = found.img_dir / image["file_name"]
            if link:
                os.link(source, dest)
            else:
                shutil.copy2(source, dest)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, found in splits.items():
        ann = out / "annotations" / f"instances_{split}.json"
        tmp = ann.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(found.instances))
        os.replace(tmp, ann)
        written[split] = ann
    return written
