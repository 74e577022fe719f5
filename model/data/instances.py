"""What the YOLO and VOC readers build: a COCO instances dict (pixel xywh boxes) over one image folder.

`CocoDetection(source, img_dir, data=split.instances)` then serves it like any COCO file, so training,
evaluation (pycocotools) and `rtmdet convert` see one representation whatever the format on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("coco", "yolo", "voc")  # the dataset layouts `model.data.formats` reads
# What cv2.imread decodes, as Ultralytics lists them (less the formats OpenCV cannot read).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


@dataclass
class SplitInstances:
    """One split: `instances` (COCO dict, category ids 1..C in class order), image `file_name`s relative to
    `img_dir`, and the file it was read from (named in errors and by `CocoDetection.ann_file`)."""

    instances: dict
    img_dir: Path
    source: Path


@dataclass
class InstancesBuilder:
    class_names: list[str]
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        return image_id

    def add_box(self, image_id: int, label: int, x1: float, y1: float, x2: float, y2: float,
                crowd: bool = False) -> None:
        w, h = x2 - x1, y2 - y1
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                 "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd)})

    def to_dict(self) -> dict:
        return {"images": self.images, "annotations": self.annotations,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]}


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as cv2.imread returns it: EXIF orientations 5-8 swap the sides, since
    OpenCV applies the rotation (and labelling tools label the rotated picture). Reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
