#!/usr/bin/env python3
"""glibc's default malloc against `model.inference.allocator.keep_freed_memory`, for the eager runner.

    .venv/bin/python bench/bench_allocator.py [--size tiny] [--batches 1 8] [--threads 1] [--rounds 4]

The setting is process-wide and cannot be undone, so each side runs in its own child process; the sides
alternate (default, kept, default, kept, ...) `--rounds` times per batch size, each child timing `--calls`
forwards after 3 warm-up ones. Printed: median ms per image, minor page faults per forward and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, {root!r})
from model.inference.allocator import keep_freed_memory
kept = {kept} and keep_freed_memory()
torch.set_num_threads({threads})
from model.inference.accelerate import EagerRunner
from model.inference.preprocess import Normalizer
from model.nn.rtmdet import build_rtmdet, fused_for_inference
net = fused_for_inference(build_rtmdet({size!r})).eval().to(memory_format=torch.channels_last)
runner = EagerRunner(net, Normalizer(torch.device("cpu"), torch.float32, True))
x = torch.randint(0, 255, ({batch}, 640, 640, 3), dtype=torch.uint8)
for _ in range(3):
    runner(x)
times, faults = [], []
for _ in range({calls}):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    runner(x)
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"kept": kept, "ms_per_image": statistics.median(times) * 1e3 / {batch},
                  "faults": statistics.median(faults), "rss_mb": rss_mb}}))
"""


def run_child(kept: bool, size: str, batch: int, threads: int, calls: int) -> dict:
    code = CHILD.format(root=str(ROOT), kept=kept, size=size, batch=batch, threads=threads, calls=calls)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    print("| batch | malloc | ms/image (median of rounds) | minor faults / forward | peak RSS MB | kept / default |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        results: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds):
            for kept in (False, True):
                results[kept].append(run_child(kept, args.size, batch, args.threads, args.calls))
        med = {k: statistics.median(r["ms_per_image"] for r in v) for k, v in results.items()}
        for kept, label in ((False, "glibc default"), (True, "kept (keep_freed_memory)")):
            rs = results[kept]
            ratio = f"{med[False] / med[True]:.2f}x" if kept else ""
            print(f"| {batch} | {label} | {med[kept]:.1f} | {statistics.median(r['faults'] for r in rs):.0f} | "
                  f"{max(r['rss_mb'] for r in rs):.0f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
