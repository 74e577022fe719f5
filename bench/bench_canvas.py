#!/usr/bin/env python3
"""The tight canvas against the square one: the Detector from decoded image to boxes, on photos of common shapes.

    .venv/bin/python bench/bench_canvas.py [--sizes tiny s] [--input-size 640] [--batches 1 8] [--threads 1 2]
        [--shapes 4:3 16:9 3:4 1:1] [--seconds 2] [--rounds 4] [--workload seeded|shipped] [--sparse]

`square` letterboxes every image to input-size x input-size (the official pipeline, and what a static ONNX export
takes); `tight` pads the resized image only to a multiple of 32 (model.inference.preprocess), so a 4:3 photo at
640 runs at 640 x 480. For one photo shape per row (real photos from examples/, resized to it; a batch is all of
that shape, as one camera's frames are), every runner of bench/bench_runners.py (eager, this project's ONNX
Runtime and OpenVINO runners, and `auto`'s pick, seeded weights, BatchNorm folded) runs the whole Detector on
both canvases, and the plain runtimes (ONNX Runtime, OpenVINO: one session with all the threads) on the square
canvas, as a user of a fixed-shape export runs them with our pre/post. All timed in `--rounds` alternating rounds
of equal calls; images/s, the median call decides. `best tight / best peer`: the faster of our runners on the
tight canvas over the faster plain runtime. The detections of the two canvases differ a little (the network
sees less padding); `rtmdet eval --canvas tight` measures what that does to mAP.

`--workload shipped`: the shipped shapes model (RTMDet-tiny, trained at 320: use `--input-size 320`) on drawn
shapes scenes it never saw, resized to each shape (a few real boxes an image), instead of seeded weights on photos
(no box passes the threshold). `--sparse`: our Detectors run sparse box regression (model.inference.sparse_regression,
the service's default on the CPU), the plain runtimes the whole network, as in bench_runners' `auto+sparse`.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import cv2
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_model import machine_line, photos  # noqa: E402
from bench_runners import auto_pick, build_model, interleaved, runners_for  # noqa: E402

from model import Detector, TestConfig  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from model.inference.runner_choice import nearest_size  # noqa: E402

OURS = ("eager", "onnxruntime", "openvino")
PEERS = ("ort_plain", "ov_plain")


def shaped(images: list, shape: str, long_side: int = 1280):
    """images(n): `images` resized to `shape` (W:H) with the long side `long_side`, in turn."""
    w, h = (int(v) for v in shape.split(":"))
    size = (long_side, round(long_side * h / w)) if w >= h else (round(long_side * w / h), long_side)
    base = [cv2.resize(p, size, interpolation=cv2.INTER_AREA if p.shape[1] > size[0] else cv2.INTER_LINEAR)
            for p in images]
    return lambda n: [base[i % len(base)] for i in range(n)]


def source(workload: str, size: str):
    """(model, class names, the images to resize) of a workload."""
    if workload == "seeded":
        return build_model(size), None, photos(2)
    if size != "tiny":
        raise SystemExit("--workload shipped is RTMDet-tiny: add --sizes tiny")
    import numpy as np

    from model.data.shapes import ShapesConfig, _load_photos, draw_shapes_image
    from model.inference.detector import load_torch_network

    model, names, _ = load_torch_network(ROOT / "weights" / "rtmdet_tiny_shapes.pth", "tiny")
    rng, backgrounds = np.random.default_rng(4242), _load_photos()  # a seed the training never saw
    scenes = [draw_shapes_image(rng, ShapesConfig(img_size=640, min_aspect=0.99), backgrounds)[0] for _ in range(4)]
    return model.eval(), names, scenes


def bench(size: str, input_size: int, threads: int, batches: list[int], shapes: list[str], seconds: float,
          rounds: int, workload: str = "seeded", sparse: bool = False) -> list[dict]:
    torch.set_num_threads(threads)
    model, names, pictures = source(workload, size)
    cfgs = {c: TestConfig.serving(input_size=input_size, canvas=c) for c in ("square", "tight")}
    base = Detector(model, names, device="cpu", test_cfg=cfgs["square"], accelerate="eager")
    runners = runners_for(base, threads, inductor=False, any_canvas=True)  # the peers: a square-only export
    ours_base = Detector(model, names, device="cpu", test_cfg=cfgs["square"], accelerate="eager",
                         sparse_regression=True) if sparse else base
    ours = runners_for(ours_base, threads, inductor=False, peers=False, any_canvas=True) if sparse else runners
    examples = [base.preprocess(shaped(pictures, "1:1")(b))[0] for b in sorted({min(batches), max(batches)})]
    choice = auto_pick(ours, examples, threads)
    print(json.dumps({"size": size, "threads": threads, "workload": workload, "sparse": sparse,
                      "auto": choice.summary()}), flush=True)
    dets = {}
    for name in (*OURS, *PEERS):
        runner = runners[name] if name in PEERS else ours[name]
        for canvas in ("square",) if name in PEERS else ("square", "tight"):
            d = Detector(model, names, device="cpu", test_cfg=cfgs[canvas], accelerate="eager",
                         sparse_regression=sparse and name not in PEERS)
            d.set_runner(runner, name)
            dets[name, canvas] = d
    rows = []
    for shape in shapes:
        images = shaped(pictures, shape)
        for b in batches:
            imgs = images(b)
            tight_canvas = tuple(dets["eager", "tight"].preprocess(imgs)[0].shape[1:3])
            times = interleaved({f"{n} {c}": partial(d, imgs) for (n, c), d in dets.items()}, seconds, rounds)
            picked = choice.by_batch[nearest_size(list(choice.by_batch), b)]
            boxes = sum(len(d.boxes) for d in dets["eager", "tight"](imgs)) / b
            row = {"shape": shape, "batch": b, "threads": threads, "size": size, "tight_canvas": tight_canvas,
                   "auto": picked, "boxes_per_image": boxes, **{k: b / v for k, v in times.items()}}
            row["best_peer"] = max(row[f"{p} square"] for p in PEERS)
            row["best_tight"] = max(row[f"{n} tight"] for n in OURS)
            rows.append(row)
            print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
    return rows


def print_table(rows: list[dict], input_size: int) -> None:
    head = ("photo", "canvas", "size", "batch", "threads", *(f"{n} {c}" for n in OURS for c in ("square", "tight")),
            "ONNX Runtime (square)", "OpenVINO (square)", "auto picks", "boxes / image", "auto: tight / square",
            "best tight / best peer")
    print(f"\nimages/s, the Detector from decoded image to boxes at {input_size} (higher is better)")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        a = r["auto"]
        print(f"| {r['shape']} | {r['tight_canvas'][0]}x{r['tight_canvas'][1]} | {r['size']} | {r['batch']} | "
              f"{r['threads']} | " + " | ".join(f"{r[f'{n} {c}']:.2f}" for n in OURS for c in ("square", "tight"))
              + f" | {r['ort_plain square']:.2f} | {r['ov_plain square']:.2f} | {a} | {r['boxes_per_image']:.1f} | "
              f"{r[f'{a} tight'] / r[f'{a} square']:.2f}x | {r['best_tight'] / r['best_peer']:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--input-size", type=int, default=640)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--shapes", nargs="+", default=["4:3", "16:9", "3:4", "1:1"], help="photo shapes, W:H")
    ap.add_argument("--seconds", type=float, default=2.0, help="per Detector per row, over all rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--workload", choices=("seeded", "shipped"), default="seeded")
    ap.add_argument("--sparse", action="store_true", help="our Detectors with sparse box regression")
    args = ap.parse_args()
    keep_freed_memory()
    print(machine_line(), flush=True)
    rows = [row for threads in args.threads for size in args.sizes
            for row in bench(size, args.input_size, threads, args.batches, args.shapes, args.seconds, args.rounds,
                             args.workload, args.sparse)]
    print_table(rows, args.input_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
