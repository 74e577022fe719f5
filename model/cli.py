"""`rtmdet` sub-commands that belong to the model: detect (and, from the training package, train/eval/...).

Each `add_*` function registers one sub-command on an argparse sub-parser collection; `service.cli`
assembles them into the one `rtmdet` program.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.cli_support import (
    add_accelerate_arguments,
    add_canvas_argument,
    add_weights_key_argument,
    device_name,
    fraction,
    positive_int,
)
from model.config import SIZES

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "rtmdet_tiny_shapes.pth"


def add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="detect objects in image files and print JSON")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint file or zoo name (rtmdet-s, ...)")
    p.add_argument("--size", default=None, choices=SIZES, help="default: the zoo name's size, else tiny")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--score-thr", type=fraction, default=0.3)
    p.add_argument("--img-size", type=positive_int, default=None, help="letterbox size (default: the training size)")
    p.add_argument("--fp16", action="store_true", help="half precision (CUDA only)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", type=Path, help="directory for copies of the images with boxes drawn")
    add_canvas_argument(p)
    add_weights_key_argument(p)
    add_accelerate_arguments(p)
    p.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from model.errors import UserError
    from model.inference.allocator import keep_freed_memory
    from model.inference.detector import Detector, load_image
    from model.render import draw_detections
    from model.zoo import resolve_weights, zoo_size

    keep_freed_memory()  # a command owns its process (model.inference.allocator)
    try:
        weights = resolve_weights(args.weights, kind="detector", size=args.size)
        size = args.size or zoo_size(args.weights) or "tiny"
        detector = Detector.from_checkpoint(weights, size=size, device=args.device, fp16=args.fp16,
                                            weights_key=args.weights_key or "ema", accelerate=args.accelerate,
                                            calibration=args.calibration, canvas=args.canvas)
    except ValueError as exc:  # a checkpoint that does not fit, fp16 without CUDA, ...
        raise UserError(str(exc)) from None
    detector.cfg = detector.with_config(score_thr=args.score_thr, input_size=args.img_size or detector.input_size)
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        images = [load_image(p) for p in paths]
        for path, img, dets in zip(paths, images, detector(images)):
            results.append({"image": str(path), "width": img.shape[1], "height": img.shape[0],
                            "detections": dets.to_list()})
            if args.out:
                import cv2
                args.out.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(args.out / (path.stem + "_det.jpg")), draw_detections(img, dets))
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0
