#!/usr/bin/env python3
"""The reduced-precision runners (openvino-bf16, openvino-int8) beside the float32 ones: speed, one run.

    .venv/bin/python bench/bench_low_precision.py [--size tiny] [--batches 1 8] [--threads 1] [--seconds 2]
        [--rounds 4] [--img-size 640]

On bench_runners' seeded weights (80 classes, BatchNorm folded), one ONNX export serves ONNX Runtime,
OpenVINO float32, OpenVINO bfloat16 and OpenVINO INT8 (NNCF, calibrated on the bench photos letterboxed: the
speed of an INT8 graph does not depend on its calibration images; its accuracy does, and is measured on the
shapes set with `rtmdet eval --accelerate ...`, README Performance). Rows: the runner alone (uint8 batch in,
raw head outputs out), images/s, all timed in `--rounds` alternating rounds of equal calls
(bench_runners.interleaved); `/ best fp32` divides by the faster of ONNX Runtime and OpenVINO float32 in the
same row; `peak err` is the largest difference from eager's outputs relative to that output's peak.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from bench_model import machine_line, photos  # noqa: E402
from bench_runners import build_model, interleaved  # noqa: E402

from model import Detector, TestConfig  # noqa: E402
from model.inference.accelerate import EagerRunner  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from model.inference.low_precision import (  # noqa: E402
    Calibration,
    LowPrecisionUnavailable,
    build_low_precision_runner,
)
from model.inference.onnx_runners import OnnxRuntimeRunner, OpenVINORunner, export_network  # noqa: E402
from model.inference.runner_choice import peak_relative_error  # noqa: E402

FP32_PEERS = ("onnxruntime", "openvino")
LOW = ("openvino-bf16", "openvino-int8")
CALIBRATION_PHOTOS = 8


def build_runners(det: Detector, threads: int) -> tuple[dict[str, object], dict[str, str]]:
    """The runners, and why each reduced-precision mode this machine cannot run is left out (e.g. bf16 on a
    CPU without bfloat16 arithmetic: the row says so rather than timing float32 under the bf16 name)."""
    runners: dict[str, object] = {"eager": EagerRunner(det.network, det.normalize)}
    missing: dict[str, str] = {}
    calibration = Calibration.of(photos(CALIBRATION_PHOTOS))
    with export_network(det.network, det.strides, det.input_size) as path:
        runners["onnxruntime"] = OnnxRuntimeRunner(path, threads)
        runners["openvino"] = OpenVINORunner(path, threads)
        for mode in LOW:
            try:
                runners[mode] = build_low_precision_runner(mode, path, threads, det.input_size, calibration)
            except LowPrecisionUnavailable as exc:
                missing[mode] = str(exc)
                print(f"{mode} left out: {exc}", flush=True)
    return runners, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--img-size", type=int, default=640)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--seconds", type=float, default=2.0, help="per runner per row, over all rounds")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    keep_freed_memory()  # eager as `rtmdet serve` runs it (model.inference.allocator)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        det = Detector(build_model(args.size), device="cpu", test_cfg=TestConfig.serving(input_size=args.img_size),
                       accelerate="eager")
        runners, missing = build_runners(det, threads)
        for b in args.batches:
            x, _ = det.preprocess(photos(b))
            ref = runners["eager"](x)
            errors = {k: peak_relative_error(r(x), ref) for k, r in runners.items()}
            per_call = interleaved({k: partial(r, x) for k, r in runners.items()}, args.seconds, args.rounds)
            rows.append((b, threads, {k: b / v for k, v in per_call.items()}, errors, missing))
            print(f"batch {b}, {threads} threads: " + ", ".join(f"{k} {b / v:.2f}/s" for k, v in per_call.items()),
                  flush=True)
    print(f"\n{args.size} {args.img_size}x{args.img_size}, forward images/s (higher is better); "
          "/ best fp32 = over the faster of ONNX Runtime and OpenVINO float32 in that row\n")
    print("| batch | threads | runner | images/s | / best fp32 | peak err |\n|---|---|---|---|---|---|")
    for b, threads, speed, errors, missing in rows:
        best = max(speed[k] for k in FP32_PEERS)
        for name in ("eager", *FP32_PEERS, *LOW):
            if name in missing:
                print(f"| {b} | {threads} | {name} | unavailable here | - | - |")
            else:
                print(f"| {b} | {threads} | {name} | {speed[name]:.2f} | {speed[name] / best:.2f}x | "
                      f"{errors[name]:.1e} |")
    import nncf
    import onnxruntime
    import openvino

    print(f"\n{machine_line()}; onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, "
          f"nncf {nncf.__version__}; seeded weights, BatchNorm folded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
