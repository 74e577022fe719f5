"""Pascal VOC sets: `ImageSets/Main/<split>.txt` lists ids, `Annotations/<id>.xml` boxes, `JPEGImages/` images.

Boxes follow the VOC convention, 1-based inclusive pixel indices: `xmin..xmax` covers pixels xmin-1 .. xmax-1 in
0-based terms, i.e. the continuous box [xmin - 1, xmax] (as MMDetection's VOC-to-COCO converter reads them).
Objects marked `difficult` become COCO crowd boxes: left out of training and ignored by the evaluation, as VOC's
own protocol ignores them.

Class names: a `labels.txt` (or `classes.txt`) at the root, one per line, fixes them and their order; without one,
a set whose objects use exactly the 20 VOC classes gets them in the standard order, any other set the sorted names
found in all of its splits (so train and val share one mapping).
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from model.data.instances import IMAGE_SUFFIXES, InstancesBuilder, SplitInstances, image_size

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
SPLITS = ("train", "val", "trainval", "test")
CLASS_FILES = ("labels.txt", "classes.txt")


def is_voc_root(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "ImageSets" / "Main").is_dir()


def split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Main" / f"{split}.txt"


def available_splits(root: Path) -> list[str]:
    found = [s for s in SPLITS if split_file(root, s).is_file()]
    if "train" in found and "val" in found and "trainval" in found:
        found.remove("trainval")  # the union of the other two
    return found


def split_ids(root: Path, split: str) -> list[tuple[str, int]]:
    """[(image id, line number)] of `split`; FileNotFoundError if the set has no such split."""
    path = split_file(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {path.relative_to(root)}")
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise ValueError(f"{path}:{lineno}: want one image id per line, got {line.strip()!r}")
        ids.append((fields[0], lineno))
    return ids


def _annotation(root: Path, split: str, image_id: str, lineno: int) -> tuple[Path, ET.Element]:
    """(path, parsed root element) of the annotation line `lineno` of `split` names."""
    path = root / "Annotations" / f"{image_id}.xml"
    if not path.is_file():
        raise ValueError(f"{split_file(root, split)}:{lineno}: no annotation file {path}")
    return path, _parse_xml(path)


def _parse_xml(path: Path) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not valid XML ({exc})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: root element is <{root.tag}>, want <annotation>")
    return root


def _object_names(path: Path, xml: ET.Element) -> list[str]:
    names = []
    for i, obj in enumerate(xml.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{path}: object {i} has no <name>")
        names.append(name)
    return names


def voc_class_names(root: Path) -> list[str]:
    for name in CLASS_FILES:
        if (root / name).is_file():
            names = [line.strip() for line in (root / name).read_text().splitlines() if line.strip()]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{root / name}: want one distinct class name per line")
            return names
    found: set[str] = set()
    for split in available_splits(root):
        for image_id, lineno in split_ids(root, split):
            found.update(_object_names(*_annotation(root, split, image_id, lineno)))
    if not found:
        raise ValueError(f"{root}: no objects in any split, so no class names; list them in {root / 'labels.txt'}")
    return list(VOC_CLASSES) if found == set(VOC_CLASSES) else sorted(found)


def _image_file(root: Path, image_id: str, xml: ET.Element, xml_path: Path) -> Path:
    folder = root / "JPEGImages"
    candidates = [folder / f"{image_id}.jpg"]
    named = (xml.findtext("filename") or "").strip()
    if named and Path(named).name == named:  # a bare file name; a path could point outside JPEGImages/
        candidates.append(folder / named)
    candidates += [folder / f"{image_id}{s}" for s in IMAGE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError(f"{xml_path}: image missing (looked for {folder / image_id}.* and {named or 'no <filename>'})")


def _number(path: Path, where: str, element: ET.Element | None, tag: str) -> float:
    text = element.findtext(tag) if element is not None else None
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where}: <{tag}> is {text!r}, want a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}: {where}: <{tag}> is {text!r}, want a finite number")
    return value


def read_voc_split(root: Path, split: str, class_names: list[str] | None = None) -> SplitInstances:
    ids = split_ids(root, split)
    names = class_names or voc_class_names(root)
    label_of = {n: i for i, n in enumerate(names)}
    builder = InstancesBuilder(names)
    for image_id, lineno in ids:
        xml_path, xml = _annotation(root, split, image_id, lineno)
        image = _image_file(root, image_id, xml, xml_path)
        width, height = image_size(image)
        size = xml.find("size")
        if size is not None and size.findtext("width") and size.findtext("height"):
            w_xml, h_xml = _number(xml_path, "<size>", size, "width"), _number(xml_path, "<size>", size, "height")
            # 0 x 0 is a known labelImg slip; the image's own size stands then.
            if (w_xml, h_xml) != (0, 0) and (w_xml, h_xml) != (width, height):
                raise ValueError(f"{xml_path}: <size> says {w_xml:g}x{h_xml:g} but {image.name} is {width}x{height}")
        img_id = builder.add_image(image.relative_to(root / "JPEGImages").as_posix(), width, height)
        for i, (obj, name) in enumerate(zip(xml.findall("object"), _object_names(xml_path, xml), strict=True)):
            where = f"object {i} ({name})"
            if name not in label_of:
                raise ValueError(f"{xml_path}: {where}: class not in the {len(names)} class names")
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{xml_path}: {where} has no <bndbox>")
            xmin, ymin, xmax, ymax = (_number(xml_path, where, box, t) for t in ("xmin", "ymin", "xmax", "ymax"))
            if not (0 <= xmin <= xmax <= width and 0 <= ymin <= ymax <= height):
                raise ValueError(f"{xml_path}: {where}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) outside the "
                                 f"{width}x{height} image or inverted")
            difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
            # xmin = 0 breaks the 1-based convention (some labelling tools write it); clamp to the image.
            builder.add_box(img_id, label_of[name], max(xmin - 1, 0.0), max(ymin - 1, 0.0), xmax, ymax,
                            crowd=difficult)
    return SplitInstances(builder.to_dict(), root / "JPEGImages", split_file(root, split))
