#!/usr/bin/env python3
"""Eager and inductor with and without Winograd F(4x4, 3x3) (model.inference.winograd), beside the plain ONNX
Runtime and OpenVINO, on the network forward; and each convolution shape of the network alone, direct against Winograd.

    .venv/bin/python bench/bench_winograd.py [--sizes tiny s] [--batches 1 8] [--threads 1 2] [--rounds 4]
        [--input-size 640] [--convs]

Network rows: seeded weights (bench_runners.build_model), BatchNorm folded, a random uint8 batch; the runners as
the Detector builds them on the CPU (a batch of 2+ cut over one-thread streams when there are 2+ threads;
inductor frozen), the peers as a plain user runs them (one session / compiled model with all the threads,
static export). Every runner of a row is timed in `--rounds` alternating rounds (bench_runners.interleaved),
the median per call decides. `peak err`: the Winograd runners' worst output's max |difference| over its peak,
against eager with direct convolutions.

`--convs`: every 3x3 stride-1 convolution shape of RTMDet-tiny at 640 (channels in -> out @ map size), inductor
frozen, direct (oneDNN, SiLU fused) against Winograd (+ SiLU), batch 1, 1 thread: how `MIN_CHANNELS` was set.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from bench_model import machine_line  # noqa: E402
from bench_runners import build_model, interleaved  # noqa: E402

from model import Detector, TestConfig  # noqa: E402
from model.inference.accelerate import EagerRunner, InductorRunner  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from model.inference.onnx_runners import OnnxRuntimeRunner, OpenVINORunner, export_network  # noqa: E402
from model.inference.pointwise import with_pointwise_gemm  # noqa: E402
from model.inference.runner_choice import peak_relative_error  # noqa: E402
from model.inference.streams import with_streams  # noqa: E402
from model.inference.winograd import WinogradConv2d  # noqa: E402

# (in, out, map) of RTMDet-tiny's stride-1 3x3 convolutions at 640: stem, backbone blocks, neck blocks, head.
TINY_CONVS = ((12, 12, 320), (12, 24, 320), (24, 24, 160), (48, 48, 80), (96, 96, 40), (192, 192, 20),
              (192, 96, 40), (384, 96, 20), (96, 96, 80), (96, 96, 20))


def network_rows(size: str, threads: int, batches: list[int], rounds: int, seconds: float,
                 input_size: int) -> list[dict]:
    torch.set_num_threads(threads)
    det = Detector(build_model(size), device="cpu", accelerate="eager",
                   test_cfg=TestConfig.serving(input_size=input_size))
    net = det.engine_network
    # Both eager rows run the 1x1s as the Detector does (model.inference.pointwise): only the 3x3s differ.
    runners = {"eager direct": with_streams(EagerRunner(with_pointwise_gemm(net)[0], det.normalize), threads),
               "eager winograd": with_streams(EagerRunner(net, det.normalize, fast=True), threads),
               "inductor direct": with_streams(InductorRunner(net, det.normalize, winograd=False), threads),
               "inductor winograd": with_streams(InductorRunner(net, det.normalize, winograd=True), threads)}
    with export_network(net, det.strides, input_size) as path:
        runners["ONNX Runtime"] = OnnxRuntimeRunner(path, threads, streams=1)
        runners["OpenVINO"] = OpenVINORunner(path, threads, streams=1)
    rows = []
    for b in batches:
        x = torch.randint(0, 256, (b, input_size, input_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(b))
        ref = runners["eager direct"](x)
        errors = {k: peak_relative_error(r(x), ref) for k, r in runners.items()}
        times = interleaved({k: partial(r, x) for k, r in runners.items()}, seconds, rounds)
        row = {"size": size, "threads": threads, "batch": b, **{k: b / t for k, t in times.items()},
               "peak_err_winograd": max(errors["inductor winograd"], errors["eager winograd"])}
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


def conv_rows(rounds: int, seconds: float) -> list[dict]:
    from torch._inductor import config as inductor_config

    torch.set_num_threads(1)
    rows = []
    for c, k, h in TINY_CONVS:
        conv = nn.Conv2d(c, k, 3, padding=1).eval()
        x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
        calls = {}
        for name, module in (("direct", nn.Sequential(conv, nn.SiLU()).to(memory_format=torch.channels_last)),
                             ("winograd", WinogradConv2d(conv, compiled=True, silu=True))):
            compiled = torch.compile(module)

            def call(f=compiled, x=x):
                with torch.no_grad(), inductor_config.patch(freezing=True):
                    return f(x)
            calls[name] = call
        times = interleaved(calls, seconds, rounds)
        row = {"conv": f"{c}->{k} @ {h}x{h}", "direct_ms": times["direct"] * 1e3,
               "winograd_ms": times["winograd"] * 1e3, "speedup": times["direct"] / times["winograd"]}
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="per runner per row, over all rounds")
    ap.add_argument("--input-size", type=int, default=640)
    ap.add_argument("--convs", action="store_true", help="the per-convolution table instead of the networks")
    args = ap.parse_args()
    keep_freed_memory()  # as `rtmdet serve` runs (model.inference.allocator)
    print(machine_line(), flush=True)
    if args.convs:
        rows = conv_rows(args.rounds, args.seconds)
        print("\n| convolution | direct ms | winograd ms | winograd speed-up |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['conv']} | {r['direct_ms']:.2f} | {r['winograd_ms']:.2f} | {r['speedup']:.2f}x |")
        return 0
    rows = [r for t in args.threads for s in args.sizes
            for r in network_rows(s, t, args.batches, args.rounds, args.seconds, args.input_size)]
    cols = ("eager direct", "eager winograd", "inductor direct", "inductor winograd", "ONNX Runtime", "OpenVINO")
    print(f"\nimages/s, network forward, {args.input_size}x{args.input_size}; best peer = the faster of ONNX "
          "Runtime and OpenVINO in the row")
    print("\n| size | batch | threads | " + " | ".join(cols) +
          " | eager: winograd / direct | inductor: winograd / direct | eager winograd / best peer"
          " | inductor winograd / best peer | peak err |\n|" + "---|" * (len(cols) + 8))
    for r in rows:
        best = max(r["ONNX Runtime"], r["OpenVINO"])
        print(f"| {r['size']} | {r['batch']} | {r['threads']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) +
              f" | {r['eager winograd'] / r['eager direct']:.2f}x"
              f" | {r['inductor winograd'] / r['inductor direct']:.2f}x | {r['eager winograd'] / best:.2f}x"
              f" | {r['inductor winograd'] / best:.2f}x | {r['peak_err_winograd']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
