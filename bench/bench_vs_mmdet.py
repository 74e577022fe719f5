#!/usr/bin/env python3
"""This project vs MMDetection 3.3.0, side by side in one run: one table (what `make bench` prints).

    .venv/bin/python bench/bench_vs_mmdet.py [--sizes tiny s] [--batches 1 8] [--threads 1 2] [--seconds 3]
        [--train-sizes 320 640] [--train-batch 8] [--train-steps 4] [--train-compile] [--no-train] [--no-infer]

Rows, each pair measured one right after the other with the same thread count and environment:
- infer: this project's whole Detector on real photos (letterbox, forward, decode, NMS at serving thresholds)
  in images/s, against MMDetection's network forward alone (bench/mmdet_peer.py, a long-lived process in
  MMDetection's venv; random weights and input: the forward's cost depends on neither). The two alternate in
  rounds of equal calls, so both see the same load on a shared machine. Post-processing's share of our
  forward is shown at serving (score 0.3) and evaluation (0.001, nms_pre 30000) thresholds.
- train: one training step (forward, assigner + loss, backward, AdamW; ours adds the EMA update) on the same
  prepared batches (real cached-Mosaic/MixUp loader output over a generated shapes set), ours in this process,
  MMDetection's in its venv (bench/mmdet_train_step.py --serve), step i of each back to back (which side goes
  first alternates), the first 2 steps of each untimed (oneDNN builds its primitives then); images/s from the
  median step. The Trainer's defaults (eager, channels_last); `--train-compile` adds a row per size with
  `rtmdet train --compile` (its compile happens in the untimed first step).
MMDetection runs in /tmp/mmdet-ref-venv ($MMDET_VENV); without it the peer columns read n/a.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_model import machine_line, photos, timed  # noqa: E402

from model import Detector, TestConfig, build_rtmdet  # noqa: E402
from model.testing import fill_deterministic  # noqa: E402

MMDET_PY = Path(os.environ.get("MMDET_VENV", "/tmp/mmdet-ref-venv")) / "bin" / "python"


class MMDetPeer:
    """bench/mmdet_peer.py in MMDetection's venv, kept running so its forwards interleave with ours."""

    def __init__(self, threads: int) -> None:
        self.proc = subprocess.Popen([str(MMDET_PY), str(BENCH / "mmdet_peer.py"), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def forward_times(self, size: str, batch: int, n: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"size": size, "batch": batch, "img": 640, "n": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(ours, peer_times, seconds: float, rounds: int) -> tuple[float, float | None]:
    """Median seconds per call of `ours()` and of the peer, measured in alternating rounds of equal calls."""
    ours()  # warm (the peer warms itself on a new shape)
    t0 = time.perf_counter()
    ours()
    per_round = max(1, round(seconds / rounds / max(time.perf_counter() - t0, 1e-6)))
    mine, theirs = [], []
    for _ in range(rounds):
        for _ in range(per_round):
            t0 = time.perf_counter()
            ours()
            mine.append(time.perf_counter() - t0)
        if peer_times is not None:
            theirs += peer_times(per_round)
    return statistics.median(mine), (statistics.median(theirs) if theirs else None)


def infer_row(size: str, batch: int, threads: int, seconds: float, peer: MMDetPeer | None, rounds: int) -> dict:
    torch.set_num_threads(threads)
    model = fill_deterministic(build_rtmdet(size), 0)
    with torch.no_grad():  # a realistic score distribution: most priors are background
        for conv in model.bbox_head.rtm_cls:
            conv.bias.fill_(-4.0)
    det = Detector(model, device="cpu")
    det.warmup([batch])
    imgs = photos(batch)
    x, infos = det.preprocess(imgs)
    cls, reg = det.forward(x)
    t_fwd = timed(partial(det.forward, x), seconds / 2)
    t_post = timed(partial(det.postprocess, cls, reg, infos, TestConfig.serving()), seconds / 4)
    t_eval = timed(partial(det.postprocess, cls, reg, infos, TestConfig()), seconds / 4)
    t_all, t_peer = interleaved(partial(det, imgs), partial(peer.forward_times, size, batch) if peer else None,
                                2 * seconds, rounds)
    return {"what": "infer", "size": size, "input": 640, "batch": batch, "threads": threads,
            "ours": batch / t_all, "peer": batch / t_peer if t_peer else None,
            "ours_forward": batch / t_fwd, "post@0.3": t_post / t_fwd, "post@0.001": t_eval / t_fwd,
            "accelerate": det.accelerate}


WARMUP_STEPS = 2


def train_row(img_size: int, batch: int, threads: int, steps: int, use_mmdet: bool, tmp: str,
              compile_net: bool = False) -> dict:
    from model.data.shapes import make_shapes_dataset
    from model.train.engine import TrainConfig, Trainer
    from model.train.schedule import LrSchedule

    torch.set_num_threads(threads)
    data = os.path.join(tmp, f"shapes{img_size}")
    if not os.path.isdir(data):
        make_shapes_dataset(data, batch * (steps + WARMUP_STEPS), 0, seed=0, img_size=img_size)
    cfg = TrainConfig(data=data, out=os.path.join(tmp, "out"), size="tiny", epochs=1, batch_size=batch,
                      img_size=img_size, stage2_epochs=0, workers=0, device="cpu", threads=threads, progress=False,
                      warmup_iters=10, compile=compile_net)
    trainer = Trainer(cfg)
    batches = []
    for b in trainer._loader_for(0):
        batches.append(b)
        if len(batches) == steps + WARMUP_STEPS:
            break
    schedule = LrSchedule.from_config(trainer.optim_cfg, 1, len(batches))
    trainer.net.train()
    peer = None
    if use_mmdet:
        path = os.path.join(tmp, f"batches{img_size}.pt")
        with torch.no_grad():
            torch.save([{"imgs": trainer.normalizer(imgs).contiguous(), "boxes": boxes, "labels": labels}
                        for imgs, boxes, labels in batches], path)
        peer = subprocess.Popen([str(MMDET_PY), str(BENCH / "mmdet_train_step.py"), "--batches", path, "--size",
                                 "tiny", "--num-classes", str(len(trainer.class_names)), "--threads", str(threads),
                                 "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(peer.stdout.readline())

    def peer_step(i: int) -> float:
        peer.stdin.write(json.dumps({"step": i}) + "\n")
        peer.stdin.flush()
        return json.loads(peer.stdout.readline())["seconds"]

    def ours_step(b) -> float:
        t0 = time.perf_counter()
        trainer.train_step(*b, schedule)
        return time.perf_counter() - t0

    # oneDNN creates its primitives during the first steps at a new shape, and they are several times slower;
    # the first WARMUP_STEPS of each side are not timed. The side that goes first alternates step by step.
    mine, theirs = [], []
    for i, b in enumerate(batches):
        peer_first = peer is not None and i % 2 == 1
        t_peer = peer_step(i) if peer_first else None
        t_ours = ours_step(b)
        if peer is not None and not peer_first:
            t_peer = peer_step(i)
        if i >= WARMUP_STEPS:
            mine.append(t_ours)
            if t_peer is not None:
                theirs.append(t_peer)
    if peer is not None:
        peer.stdin.close()
        peer.wait(timeout=60)
    ours = batch / statistics.median(mine)
    peer_ips = batch / statistics.median(theirs) if theirs else None
    return {"what": "train (compiled)" if compile_net else "train", "size": "tiny", "input": img_size,
            "batch": batch, "threads": threads, "ours": ours, "peer": peer_ips}


def fmt(v, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def print_table(rows: list[dict]) -> None:
    head = ("what", "size", "input", "batch", "threads", "this project img/s", "MMDetection img/s", "ratio",
            "our forward img/s", "post/fwd @0.3", "post/fwd @0.001")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        ratio = r["ours"] / r["peer"] if r["peer"] else None
        print(f"| {r['what']} | {r['size']} | {r['input']} | {r['batch']} | {r['threads']} | {r['ours']:.2f} | "
              f"{fmt(r['peer'])} | {fmt(ratio, '.2f', 'x')} | {fmt(r.get('ours_forward'))} | "
              f"{fmt(r.get('post@0.3'), '.3f')} | {fmt(r.get('post@0.001'), '.3f')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of ours / MMDetection per row")
    ap.add_argument("--train-sizes", nargs="+", type=int, default=[320, 640])
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=4, help="timed steps per side, after 2 untimed")
    ap.add_argument("--train-compile", action="store_true", help="also time `rtmdet train --compile`'s step")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--no-mmdet", action="store_true")
    args = ap.parse_args()
    use_mmdet = not args.no_mmdet and MMDET_PY.is_file()
    if not use_mmdet and not args.no_mmdet:
        print(f"MMDetection not found ({MMDET_PY}): peer columns read n/a", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            if not args.no_infer:
                peer = MMDetPeer(threads) if use_mmdet else None
                for size in args.sizes:
                    for b in args.batches:
                        rows.append(infer_row(size, b, threads, args.seconds, peer, args.rounds))
                        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                              flush=True)
                if peer is not None:
                    peer.close()
            if not args.no_train:
                for img_size in args.train_sizes:
                    for compile_net in (False, True) if args.train_compile else (False,):
                        rows.append(train_row(img_size, args.train_batch, threads, args.train_steps, use_mmdet, tmp,
                                              compile_net))
                        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                          for k, v in rows[-1].items()}), flush=True)
    print_table(rows)
    print(f"\n{machine_line()} (MMDetection's venv: torch 2.13.0); inference path: "
          f"{rows[0].get('accelerate', 'n/a') if rows else 'n/a'}, channels_last, BatchNorm folded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
