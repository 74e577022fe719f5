"""The torch engines with and without streams (model.inference.streams): one batch on all the threads against
the batch cut over one chunk per thread, in alternating rounds, beside this project's ONNX Runtime and OpenVINO
runners (which cut a batch the same way).

    .venv/bin/python bench/bench_streams.py [--size tiny] [--input-sizes 640 320] [--batch 8] [--threads 2]
        [--rounds 7] [--no-inductor] [--no-runtimes]

Seeded weights (BatchNorm folded, channels_last), a random uint8 batch (a forward's cost does not depend on the
pixels); every runner's outputs are checked against plain eager's (peak-relative) before timing. Images/s,
median of the rounds, each round one call of every runner in turn.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import build_rtmdet  # noqa: E402
from model.inference.accelerate import EagerRunner, InductorRunner, build_runner  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from model.inference.preprocess import Normalizer  # noqa: E402
from model.inference.runner_choice import peak_relative_error  # noqa: E402
from model.inference.streams import TorchStreams  # noqa: E402
from model.nn.rtmdet import fused_for_inference  # noqa: E402


def runners(net, normalize, x: torch.Tensor, strides, threads: int, inductor: bool, runtimes: bool) -> dict:
    out = {"eager": EagerRunner(net, normalize), "eager streams": TorchStreams(EagerRunner(net, normalize), threads)}
    if inductor:
        out["inductor"] = InductorRunner(net, normalize)
        out["inductor streams"] = TorchStreams(InductorRunner(net, normalize), threads)
    for mode in ("onnxruntime", "openvino") if runtimes else ():
        try:
            out[mode] = build_runner(mode, net, normalize, x, strides, threads=threads)
        except Exception as exc:  # not installed here: say so, time the rest
            print(f"{mode} skipped: {type(exc).__name__}: {exc}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--input-sizes", type=int, nargs="+", default=[640, 320])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-inductor", action="store_true", help="skip inductor (its compiles take minutes here)")
    ap.add_argument("--no-runtimes", action="store_true", help="skip our ONNX Runtime and OpenVINO runners (their "
                    "ONNX export takes ~10 s)")
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_rtmdet(args.size, num_classes=80)
    net = fused_for_inference(model).to(memory_format=torch.channels_last).eval()
    normalize = Normalizer(torch.device("cpu"), torch.float32, True)
    strides = tuple(model.bbox_head.strides)
    rows = []
    for input_size in args.input_sizes:
        x = torch.randint(0, 256, (args.batch, input_size, input_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(input_size))
        built = runners(net, normalize, x, strides, args.threads, not args.no_inductor, not args.no_runtimes)
        want = built["eager"](x)
        errors = {}
        for name, runner in built.items():
            for _ in range(2):  # the first call of a shape may compile it
                got = runner(x)
            errors[name] = peak_relative_error(got, want)
        times: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(args.rounds):
            for name, runner in built.items():
                t0 = time.perf_counter()
                runner(x)
                times[name].append(time.perf_counter() - t0)
        ips = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
        rows.append((input_size, ips, max(errors.values())))
        for runner in built.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()
    names = list(rows[0][1])
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.size}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} alternating rounds, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; images/s")
    extra = [f"{e} streams / {e}" for e in ("eager", "inductor") if e in names]
    print("| input | " + " | ".join(names + extra) + " | max peak-relative error |")
    print("|---" * (len(names) + len(extra) + 2) + "|")
    for input_size, ips, err in rows:
        ratios = [f"{ips[f'{e} streams'] / ips[e]:.2f}x" for e in ("eager", "inductor") if e in ips]
        print(f"| {input_size} | " + " | ".join(f"{ips[n]:.2f}" for n in names) + " | " + " | ".join(ratios)
              + f" | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
