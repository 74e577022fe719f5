"""COCO-format detection dataset: instances JSON + image folder -> `Sample`s with contiguous labels."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np

from model.data.sample import Sample
from model.errors import DatasetError


def _check_annotation_file(path: Path, data: object) -> None:
    """Raise ValueError naming `path` and the first entry that is not valid COCO detection data."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or non-list '{key}'")
    cat_ids, img_ids = set(), set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise ValueError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name': {cat!r}")
        if cat["id"] in cat_ids:
            raise ValueError(f"{path}: categories[{i}] repeats id {cat['id']}")
        cat_ids.add(cat["id"])
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            raise ValueError(f"{path}: images[{i}] needs an integer 'id' and a string 'file_name': {img!r}")
        if img["id"] in img_ids:
            raise ValueError(f"{path}: images[{i}] repeats id {img['id']}")
        img_ids.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict):
            raise ValueError(f"{where} is not an object: {ann!r}")
        if ann.get("image_id") not in img_ids:
            raise ValueError(f"{where} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in cat_ids:
            raise ValueError(f"{where} refers to unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
                or not all(np.isfinite(bbox))):
            raise ValueError(f"{where} has a malformed 'bbox' (want 4 finite numbers [x, y, w, h]): {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where} has a negative width or height in 'bbox': {bbox!r}")


class CocoDetection:
    """A COCO instances file and its image folder.

    Labels are contiguous 0..C-1 in ascending category-id order (MMDetection's rule), `label_to_cat_id[label]`
    maps back. Crowd annotations and zero-area boxes are ignored; with `filter_empty`, images left without a box
    are dropped (training), otherwise every image is kept (evaluation).
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path, filter_empty: bool = True, data: dict | None = None):
        """`data`: the instances dict itself (a YOLO or VOC split read by `model.data.formats`); `ann_file` then only
        names where it came from."""
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        if data is None:
            try:
                data = json.loads(self.ann_file.read_text())
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{self.ann_file}: not valid JSON ({exc})") from None
        try:
            _check_annotation_file(self.ann_file, data)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
        self.coco = coco

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: list[int] = [c["id"] for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [c["name"] for c in cats]

        # Boxes and labels of all kept images in two flat arrays (image i's rows are offsets[i]:offsets[i + 1]):
        # a data-loader worker receives this dataset pickled (workers start from a forkserver, see
        # model/data/loader.py), and two arrays pickle in milliseconds where a dict of 118k small ones (COCO
        # train2017) takes seconds. The pycocotools index is not sent at all: only evaluation uses it, in the
        # trainer's own process.
        boxes_of: list[list[list[float]]] = []
        labels_of: list[list[int]] = []
        self.image_ids: list[int] = []
        self._file_names: list[str] = []
        for img in sorted(data["images"], key=lambda m: m["id"]):
            boxes, labels = [], []
            for ann in coco.imgToAnns.get(img["id"], []):
                if ann.get("iscrowd", 0):
                    continue
                x, y, w, h = ann["bbox"]
                if w <= 0 or h <= 0:
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(self.cat_id_to_label[ann["category_id"]])
            if filter_empty and not boxes:
                continue
            boxes_of.append(boxes)
            labels_of.append(labels)
            self.image_ids.append(img["id"])
            self._file_names.append(img["file_name"])
        self._offsets = np.cumsum([0] + [len(b) for b in boxes_of], dtype=np.int64)
        self._boxes = np.asarray([b for bs in boxes_of for b in bs], np.float32).reshape(-1, 4)
        self._labels = np.asarray([lab for ls in labels_of for lab in ls], np.int64)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "coco"} | {"coco": None}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.img_dir / self._file_names[index]

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, labels) of image `index` without reading pixels (copies, safe to modify)."""
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return self._boxes[lo:hi].copy(), self._labels[lo:hi].copy()

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        path = self.image_path(index)
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read image {path} (image id {self.image_ids[index]})")
        boxes, labels = self.annotations(index)
        return Sample(img=img, boxes=boxes, labels=labels, image_id=self.image_ids[index])
