#!/usr/bin/env python3
"""Model throughput: forward, post-processing and the whole Detector, per size and batch, side by side
with MMDetection's network forward measured in the same run.

    .venv/bin/python bench/bench_model.py [--sizes tiny s] [--batches 1 8] [--threads 2] [--seconds 5]
        [--device cpu|cuda] [--mmdet-ref ../shared/tools/mmdet_ref.py | --no-mmdet]

Every row is measured now, on this machine; ratios compare numbers from the same run. Post-processing
is timed at serving thresholds (score 0.3) and at the official evaluation ones (score 0.001,
nms_pre 30000, max 300) on real photos.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import Detector, TestConfig, build_rtmdet  # noqa: E402
from model.testing import fill_deterministic  # noqa: E402

DEFAULT_MMDET_REF = ROOT.parent / "shared" / "tools" / "mmdet_ref.py"


def timed(fn, seconds: float, min_runs: int = 5, sync=lambda: None) -> float:
    """Median seconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_line() -> str:
    """When and where: UTC time, CPU model, logical CPUs, torch, OpenMP's wait policy."""
    import os

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu}, {os.cpu_count()} logical CPUs; "
            f"torch {torch.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def photos(n: int) -> list[np.ndarray]:
    import cv2
    base = [cv2.imread(str(ROOT / "examples" / f)) for f in ("astronaut.jpg", "coffee.jpg")]
    return [base[i % len(base)] for i in range(n)]


def mmdet_forward(ref: Path, size: str, batch: int, threads: int, seconds: float) -> dict | None:
    out = subprocess.run([sys.executable, str(ref), "bench", "--size", size, "--batch", str(batch), "--img", "640",
                          "--threads", str(threads), "--seconds", str(seconds)], capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if out.returncode == 0 and lines else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--mmdet-ref", type=Path, default=DEFAULT_MMDET_REF)
    ap.add_argument("--no-mmdet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    use_mmdet = not args.no_mmdet and args.mmdet_ref.is_file()

    rows = []
    for size in args.sizes:
        model = fill_deterministic(build_rtmdet(size), 0)
        with torch.no_grad():  # a realistic score distribution: most priors are background
            for conv in model.bbox_head.rtm_cls:
                conv.bias.fill_(-4.0)
        det = Detector(model, device=args.device, fp16=args.fp16)
        sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
        for b in args.batches:
            imgs = photos(b)
            batch, infos = det.preprocess(imgs)
            cls, reg = det.forward(batch)
            t_pre = timed(partial(det.preprocess, imgs), args.seconds / 4)
            t_fwd = timed(partial(det.forward, batch), args.seconds, sync=sync)
            t_post = timed(partial(det.postprocess, cls, reg, infos, TestConfig.serving()), args.seconds / 4, sync=sync)
            t_post_eval = timed(partial(det.postprocess, cls, reg, infos, TestConfig()), args.seconds / 4, sync=sync)
            t_all = timed(partial(det, imgs), args.seconds, sync=sync)
            peer = mmdet_forward(args.mmdet_ref, size, b, args.threads, args.seconds) if use_mmdet else None
            row = {
                "size": size, "batch": b, "device": str(det.device), "threads": args.threads,
                "preprocess_ms": t_pre * 1e3, "forward_ms": t_fwd * 1e3, "post_ms@0.3": t_post * 1e3,
                "post_ms@0.001": t_post_eval * 1e3, "post/forward@0.3": t_post / t_fwd,
                "post/forward@0.001": t_post_eval / t_fwd, "detector_img_s": b / t_all,
                "mmdet_forward_img_s": peer["img_per_s"] if peer else None,
            }
            row["detector_vs_mmdet_forward"] = (row["detector_img_s"] / peer["img_per_s"]) if peer else None
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    head = ("size", "batch", "forward ms", "post ms @0.3", "post/fwd @0.3", "post ms @0.001", "post/fwd @0.001",
            "detector img/s", "mmdet fwd img/s", "ratio")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        peer = f"{r['mmdet_forward_img_s']:.2f}" if r["mmdet_forward_img_s"] else "n/a"
        ratio = f"{r['detector_vs_mmdet_forward']:.2f}x" if r["detector_vs_mmdet_forward"] else "n/a"
        print(f"| {r['size']} | {r['batch']} | {r['forward_ms']:.1f} | {r['post_ms@0.3']:.2f} | "
              f"{r['post/forward@0.3']:.3f} | {r['post_ms@0.001']:.1f} | {r['post/forward@0.001']:.3f} | "
              f"{r['detector_img_s']:.2f} | {peer} | {ratio} |")
    print(f"\ndevice {rows[0]['device']}, {args.threads} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
