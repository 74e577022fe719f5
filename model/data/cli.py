"""`rtmdet make-shapes-dataset`: write the synthetic shapes set in COCO format."""
from __future__ import annotations

import argparse
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
