#!/usr/bin/env python3
"""The eager runner with its 1x1 convolutions as one matrix product over NHWC rows (model.inference.pointwise)
against the same runner with torch's own 1x1 convolutions: network forward, images/s.

    .venv/bin/python bench/bench_pointwise.py [--sizes tiny s] [--batches 1 8] [--threads 1 2] [--rounds 6]
        [--seconds 4] [--input-size 640]

Both runners are eager with Winograd as the Detector builds it (seeded weights, BatchNorm folded, channels_last,
a batch of 2+ cut over one-thread streams when there are 2+ threads); they differ only in the 1x1 convolutions.
Timed in `--rounds` alternating rounds (bench_runners.interleaved), the median per call decides; `peak err` is
the swapped runner's worst output against the other's (0: the same bits).
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from bench_model import machine_line  # noqa: E402
from bench_runners import build_model, interleaved  # noqa: E402

from model import Detector, TestConfig  # noqa: E402
from model.inference.accelerate import EagerRunner  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from model.inference.runner_choice import peak_relative_error  # noqa: E402
from model.inference.streams import with_streams  # noqa: E402
from model.inference.winograd import with_winograd  # noqa: E402


def rows_for(size: str, threads: int, batches: list[int], rounds: int, seconds: float, input_size: int):
    torch.set_num_threads(threads)
    det = Detector(build_model(size), device="cpu", accelerate="eager",
                   test_cfg=TestConfig.serving(input_size=input_size))
    net, normalize = det.engine_network, det.normalize
    swapped = EagerRunner(net, normalize, fast=True)
    native = EagerRunner(with_winograd(net)[0], normalize)  # Winograd alike, torch's own 1x1s
    assert swapped.pointwise_convs > 0 and native.pointwise_convs == 0
    runners = {"torch 1x1": with_streams(native, threads), "GEMM 1x1": with_streams(swapped, threads)}
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        x = torch.randint(0, 256, (batch, input_size, input_size, 3), dtype=torch.uint8, generator=g)
        err = peak_relative_error(runners["GEMM 1x1"](x), runners["torch 1x1"](x))
        times = interleaved({k: partial(r, x) for k, r in runners.items()}, seconds, rounds)
        speed = {k: batch / t for k, t in times.items()}
        row = {"size": size, "batch": batch, "threads": threads, **{k: round(v, 2) for k, v in speed.items()},
               "ratio": round(speed["GEMM 1x1"] / speed["torch 1x1"], 3), "peak_err": float(f"{err:.1e}")}
        print(json.dumps(row), flush=True)
        yield row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0, help="per runner per row, over all rounds")
    ap.add_argument("--input-size", type=int, default=640)
    args = ap.parse_args()
    keep_freed_memory()
    rows = [row for threads in args.threads for size in args.sizes
            for row in rows_for(size, threads, args.batches, args.rounds, args.seconds, args.input_size)]
    print(f"\n{machine_line()}; {args.input_size}x{args.input_size}, images/s\n")
    print("| size | batch | threads | torch 1x1 | GEMM 1x1 | GEMM / torch | peak err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['threads']} | {r['torch 1x1']:.2f} | {r['GEMM 1x1']:.2f} | "
              f"{r['ratio']:.2f}x | {r['peak_err']:.1e} |")


if __name__ == "__main__":
    main()
