"""`rtmdet client`'s work: which files to send, and the two output formats (JSON lines, COCO results)."""
from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.client_many import ImageResult

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


class InputError(ValueError):
    """The command line names files that cannot be used; nothing was sent."""


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Files from paths, folders (their image files, by suffix, sorted; not recursive) and globs (for patterns
    the shell did not expand, e.g. quoted; `**` recurses). Each file once, in the order given."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{spec}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        elif path.exists():
            found = [path]
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"{spec}: no file matches")
        else:
            raise InputError(f"{spec}: no such file or folder")
        files += found
    return list(dict.fromkeys(files))


@dataclass
class CocoIds:
    """COCO ids for the results: image ids from an annotation file's `file_name`s (or a running index from 1),
    category ids by class name from its categories (or the label + 1, as this repo's COCO writers number
    them)."""

    image_ids: dict[Path, int]
    category_ids: dict[str, int] | None = None

    @classmethod
    def numbered(cls, files: Sequence[Path]) -> CocoIds:
        return cls({f: i for i, f in enumerate(files, start=1)})

    @classmethod
    def from_annotations(cls, ann_path: Path, files: Sequence[Path]) -> CocoIds:
        """Matches a file by its path as given, else by its name; a file the annotations lack is an error."""
        try:
            ann = json.loads(Path(ann_path).read_text())
            by_name = {str(img["file_name"]): int(img["id"]) for img in ann["images"]}
            categories = {str(c["name"]): int(c["id"]) for c in ann["categories"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"--coco-ann {ann_path}: not a readable COCO annotation file ({exc})") from None
        ids: dict[Path, int] = {}
        for f in files:
            image_id = by_name.get(f.as_posix(), by_name.get(f.name))
            if image_id is None:
                raise InputError(f"{f}: not among the images of --coco-ann {ann_path}")
            ids[f] = image_id
        return cls(ids, categories)

    def check_classes(self, class_names: Sequence[str]) -> None:
        if self.category_ids is None:
            return
        missing = [n for n in class_names if n not in self.category_ids]
        if missing:
            raise InputError(f"the model's classes {missing} are not categories of --coco-ann "
                             f"(it has {sorted(self.category_ids)})")

    def results(self, result: ImageResult, file: Path) -> list[dict]:
        """COCO results entries (bbox as x, y, width, height) for one image's detections."""
        out = []
        for d in result.detections or ():
            x1, y1, x2, y2 = d["box"]
            category = self.category_ids[d["class_name"]] if self.category_ids is not None else d["label"] + 1
            out.append({"image_id": self.image_ids[file], "category_id": category,
                        "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "score": d["score"]})
        return out


def summary(total: int, failed: int, first_failure: ImageResult | None) -> str:
    line = f"rtmdet client: {total} images, {total - failed} ok, {failed} failed"
    if first_failure is not None:
        line += f" (first: {first_failure.name}: {first_failure.error})"
    return line
