"""Small YOLO and Pascal VOC sets written the way Ultralytics and VOC tools write them, with their ground truth
kept in pixels so a test can compare what a reader returns with what was written."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np


@dataclass
class WrittenImage:
    path: Path
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # xyxy pixels, continuous
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)


def _image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# (width, height, [(label, x1, y1, x2, y2)]) per image; the third has no objects (a negative).
SCENES = [
    (64, 48, [(0, 3.5, 4.25, 30.0, 40.0), (1, 40.0, 10.0, 64.0, 48.0)]),
    (80, 60, [(1, 0.0, 0.0, 20.0, 15.5)]),
    (56, 72, []),
    (70, 50, [(0, 10.0, 12.0, 60.0, 45.0), (0, 20.0, 5.0, 35.0, 20.0), (1, 1.0, 30.0, 9.0, 49.0)]),
]


def write_yolo_set(root: Path, names=("cat", "dog"), names_as_dict: bool = False, n_train: int = 3,
                   yaml_path: str | None = None, scenes=SCENES) -> dict[str, list[WrittenImage]]:
    """images/{train,val}/*.png + labels/{train,val}/*.txt (6 decimals, as Ultralytics writes) + data.yaml.
    The val split is given as a list file (`val.txt`), train as a folder. The negative image gets no label file
    when it is in train, an empty one in val."""
    written: dict[str, list[WrittenImage]] = {"train": [], "val": []}
    for i, (w, h, objects) in enumerate(scenes):
        split = "train" if i < n_train else "val"
        img = root / "images" / split / f"img{i}.png"
        _image(img, w, h, i)
        rec = WrittenImage(img, w, h)
        lines = []
        for label, x1, y1, x2, y2 in objects:
            rec.boxes.append((x1, y1, x2, y2))
            rec.labels.append(label)
            lines.append(f"{label} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                         f"{(y2 - y1) / h:.6f}")
        if objects or split == "val":
            label_file = root / "labels" / split / f"img{i}.txt"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("".join(line + "\n" for line in lines))
        written[split].append(rec)
    (root / "val.txt").write_text("".join(f"./images/val/{r.path.name}\n" for r in written["val"]))
    names_yaml = ("\n".join(f"  {i}: {n}" for i, n in enumerate(names)) if names_as_dict
                  else "\n".join(f"  - {n}" for n in names))
    yaml_file = Path(yaml_path) if yaml_path else root / "data.yaml"
    rel_root = Path(*[".."] * len(yaml_file.parent.relative_to(root).parts)) if yaml_path else Path(".")
    yaml_file.write_text(f"path: {rel_root.as_posix()}\ntrain: images/train\nval: val.txt\nnames:\n{names_yaml}\n")
    return written


def voc_xml(filename: str, width: int, height: int, objects) -> str:
    """An annotation as VOC's tools write it; `objects` = [(name, xmin, ymin, xmax, ymax, difficult)]."""
    parts = [f"<annotation><folder>VOC2012</folder><filename>{filename}</filename>"
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"]
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"


# (id, width, height, [(name, xmin, ymin, xmax, ymax, difficult)]) in VOC's 1-based inclusive pixel indices.
VOC_SCENES = [
    ("2008_000001", 60, 40, [("dog", 1, 1, 30, 20, False), ("kite", 35, 5, 60, 40, True)]),
    ("2008_000002", 50, 70, [("cat", 10, 12, 45, 66, False)]),
    ("2008_000003", 64, 64, []),
    ("2008_000004", 48, 36, [("dog", 5, 6, 40, 30, False), ("cat", 2, 2, 3, 3, False)]),
]


def write_voc_set(root: Path, n_train: int = 3, scenes=VOC_SCENES) -> dict[str, list[tuple]]:
    """Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt. Returns {split: scenes}."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple]] = {"train": [], "val": []}
    for i, (image_id, w, h, objects) in enumerate(scenes):
        _image(root / "JPEGImages" / f"{image_id}.jpg", w, h, 100 + i)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", w, h, objects))
        splits["train" if i < n_train else "val"].append((image_id, w, h, objects))
    for split, items in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s[0]}\n" for s in items))
    return splits
