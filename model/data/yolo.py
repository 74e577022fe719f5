"""Ultralytics YOLO detection sets: a data.yaml, images, and one `labels/<stem>.txt` of `cls cx cy w h` per image.

The layout is Ultralytics': `names` is a list or a {index: name} dict; `train`/`val`/`test` are a folder of images,
a .txt list of image paths, or a list of those, relative to `path:` (itself relative to the yaml's folder; the
yaml's folder when absent). An image's label file is its path with the last `/images/` replaced by `/labels/`
and the suffix by `.txt`; an image without one, or with an empty one, is a negative (no objects). Coordinates are
normalised to the image's width and height (as cv2 decodes it, EXIF rotation applied).

Everything malformed is a ValueError naming the file and line: a wrong field count, a class past `names`, a box
that is empty or outside the image, a label file without its image, a listed image that does not exist.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from model.data.instances import IMAGE_SUFFIXES, InstancesBuilder, SplitInstances, image_size

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")
# Labels are written rounded (Ultralytics keeps 6 decimals), so cx - w/2 of a box touching the border can land a
# hair outside [0, 1]; past this (normalised) margin a box really is outside the image.
EDGE_TOLERANCE = 1e-3


@dataclass
class YoloDataYaml:
    path: Path  # the yaml file
    root: Path  # what the split paths are relative to
    names: list[str]
    splits: dict[str, list[str]]  # split -> its entries as written (folders or list files)


def find_data_yaml(folder: Path) -> Path | None:
    """The dataset yaml of a folder: data.yaml (or .yml, dataset.yaml), else the folder's only *.yaml."""
    for name in YAML_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    return found[0] if len(found) == 1 else None


def read_data_yaml(path: Path) -> YoloDataYaml:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: want a mapping with `names` and `train`/`val`, got {type(data).__name__}")
    names = _names(path, data)
    root = Path(data["path"]) if data.get("path") else path.parent
    if not root.is_absolute():
        root = path.parent / root
    splits = {}
    for split in ("train", "val", "test"):
        value = data.get(split)
        if value is None:
            continue
        entries = value if isinstance(value, list) else [value]
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ValueError(f"{path}: `{split}` must be a path or a list of paths, got {value!r}")
        splits[split] = entries
    return YoloDataYaml(path, root, names, splits)


def _names(path: Path, data: dict) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict) and all(isinstance(k, str) and k.isdigit() for k in names):
        names = {int(k): v for k, v in names.items()}  # quoted keys: '0': person
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{path}: `names` keys must be the class indices 0..{len(names) - 1}, "
                             f"got {sorted(names, key=str)!r}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: `names` must be a non-empty list or {{index: name}} mapping, got {names!r}")
    names = [str(n) for n in names]
    if "nc" in data and data["nc"] != len(names):
        raise ValueError(f"{path}: `nc` is {data['nc']!r} but `names` lists {len(names)} classes")
    return names


def label_file_for(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` of the path becomes `/labels/`, the suffix `.txt`."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = str(image).rpartition(images)
    swapped = head + labels + tail if sep else str(image)
    return Path(swapped).with_suffix(".txt")


def split_images(spec: YoloDataYaml, split: str) -> list[Path]:
    """The image files of `split`, each once, in a stable order; FileNotFoundError if the yaml has no such split."""
    if split not in spec.splits:
        raise FileNotFoundError(f"{spec.path}: no `{split}` split")
    images: list[Path] = []
    for entry in spec.splits[split]:
        where = Path(entry) if Path(entry).is_absolute() else spec.root / entry
        if where.is_dir():
            folder_images = sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            _check_no_orphan_labels(where, set(folder_images))
            images += folder_images
        elif where.is_file():
            images += _listed_images(where)
        else:
            raise ValueError(f"{spec.path}: `{split}` entry {entry!r} is neither a folder nor a list file "
                             f"({where} does not exist)")
    return list(dict.fromkeys(images))


def _listed_images(list_file: Path) -> list[Path]:
    images = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        image = Path(line) if Path(line).is_absolute() else list_file.parent / line
        if not image.is_file():
            raise ValueError(f"{list_file}:{lineno}: listed image {line!r} does not exist ({image})")
        images.append(image)
    return images


def _check_no_orphan_labels(image_dir: Path, images: set[Path]) -> None:
    """A label file whose image is missing is a lost annotation, not something to skip quietly."""
    label_dir = label_file_for(image_dir / "x").parent
    if label_dir == image_dir or not label_dir.is_dir():
        return
    stems = {label_file_for(p) for p in images}
    for label in sorted(label_dir.rglob("*.txt")):
        if label.name != "classes.txt" and label not in stems:  # labelImg writes classes.txt beside the labels
            raise ValueError(f"{label}: label file without an image ({label.with_suffix('.*')} under {image_dir})")


def parse_label_file(label: Path, width: int, height: int, num_classes: int) -> list[tuple[int, list[float]]]:
    """[(class, [x1, y1, x2, y2] in pixels)] of one label file; errors name the file and line."""
    try:
        text = label.read_text()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{label}: not a text file ({exc})") from None
    boxes = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{lineno}"
        if len(fields) != 5:
            extra = " (segmentation polygons are not supported)" if len(fields) > 5 else ""
            raise ValueError(f"{where}: want 5 fields `class cx cy w h`, got {len(fields)}{extra}: {line.strip()!r}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{where}: not numbers: {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{where}: non-finite value: {line.strip()!r}")
        cls, cx, cy, w, h = values
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise ValueError(f"{where}: class {fields[0]} is not an index into the {num_classes} `names`")
        if w <= 0 or h <= 0:
            raise ValueError(f"{where}: empty box (width {w}, height {h})")
        corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        if min(corners) < -EDGE_TOLERANCE or max(corners) > 1 + EDGE_TOLERANCE:
            raise ValueError(f"{where}: box outside the image (normalised corners "
                             f"{', '.join(f'{c:.4g}' for c in corners)}; want 0..1)")
        x1, y1, x2, y2 = (min(max(c, 0.0), 1.0) * s for c, s in zip(corners, (width, height, width, height)))
        boxes.append((int(cls), [x1, y1, x2, y2]))
    return boxes


def read_yolo_split(yaml_path: Path, split: str) -> SplitInstances:
    spec = read_data_yaml(yaml_path)
    images = split_images(spec, split)
    if not images:
        raise ValueError(f"{yaml_path}: `{split}` holds no images ({', '.join(spec.splits[split])})")
    img_dir = Path(os.path.commonpath([p.parent for p in images]))
    builder = InstancesBuilder(spec.names)
    for image in images:
        width, height = image_size(image)
        image_id = builder.add_image(image.relative_to(img_dir).as_posix(), width, height)
        label = label_file_for(image)
        if label.is_file():
            for cls, box in parse_label_file(label, width, height, len(spec.names)):
                builder.add_box(image_id, cls, *box)
    return SplitInstances(builder.to_dict(), img_dir, yaml_path)
