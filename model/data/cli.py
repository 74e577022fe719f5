"""`rtmdet make-shapes-dataset` (the synthetic shapes set in COCO format) and `rtmdet convert` (YOLO/VOC to COCO)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model.cli_support import non_negative_int, positive_int


def add_make_shapes_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-shapes-dataset", help="write a synthetic COCO-format shapes dataset")
    p.add_argument("out", type=Path, help="output directory (train/, val/, annotations/)")
    p.add_argument("--train", type=non_negative_int, default=3000, help="number of training images")
    p.add_argument("--val", type=non_negative_int, default=300, help="number of validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--img-size", type=positive_int, default=320, help="long side of every image in pixels")
    p.set_defaults(func=run_make_shapes_dataset)


def run_make_shapes_dataset(args: argparse.Namespace) -> int:
    from model.data.shapes import make_shapes_dataset

    start = time.perf_counter()
    paths = make_shapes_dataset(args.out, args.train, args.val, seed=args.seed, img_size=args.img_size)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.train} train + {args.val} val images to {args.out} in {elapsed:.1f} s")
    for split, path in paths.items():
        print(f"  {split}: {path}")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    from model.data.instances import FORMATS

    p = sub.add_parser("convert", help="write a COCO copy of a YOLO or Pascal VOC dataset")
    p.add_argument("src", type=Path, help="YOLO folder or data.yaml, or VOC root (Annotations/, ImageSets/Main/)")
    p.add_argument("out", type=Path, help="new folder: annotations/instances_<split>.json + <split>/ images")
    p.add_argument("--to", required=True, choices=("coco",), help="target format")
    p.add_argument("--format", default="auto", choices=("auto", *[f for f in FORMATS if f != "coco"]),
                   help="source layout (auto: recognise it)")
    p.add_argument("--link", action="store_true", help="hard-link the images instead of copying them")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    import sys

    from model.data.formats import convert_to_coco

    try:
        written = convert_to_coco(args.src, args.out, args.format, link=args.link)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, ann in written.items():
        n = len(json.loads(ann.read_text())["images"])
        print(f"  {split}: {ann} ({n} images)")
    return 0
