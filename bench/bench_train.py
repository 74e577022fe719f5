#!/usr/bin/env python3
"""Training throughput of RTMDet: images/s of the full training step (forward, assigner + loss, backward,
AdamW, EMA) at given input sizes, on the CPU (and CUDA when there is one).

  .venv/bin/python bench/bench_train.py --sizes 320 640 --batch 8 --steps 5 --threads 2 [--compile]

Batches come from the real stage-1 loader (cached Mosaic + MixUp) over a small generated shapes set and are
prepared before timing, so the numbers are the model's step alone; the loader's own images/s (main
process, no workers) is printed next to it. `--compile` adds a row per size and device with `rtmdet train
--compile` (compiled during the untimed warm-up steps).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.data.shapes import make_shapes_dataset  # noqa: E402
from model.train.engine import TrainConfig, Trainer  # noqa: E402
from model.train.schedule import LrSchedule  # noqa: E402


def bench_one(data: str, out: str, size: str, img_size: int, batch: int, steps: int, warmup: int, device: str,
              threads: int, compile_net: bool = False) -> dict:
    cfg = TrainConfig(data=data, out=out, size=size, epochs=1, batch_size=batch, img_size=img_size, stage2_epochs=0,
                      workers=0, device=device, threads=threads, progress=False, warmup_iters=10, compile=compile_net)
    trainer = Trainer(cfg)
    loader = trainer._loader_for(0)
    batches, t0 = [], time.perf_counter()
    for b in loader:
        batches.append(b)
        if len(batches) == warmup + steps:
            break
    data_ips = sum(b[0].shape[0] for b in batches) / (time.perf_counter() - t0)
    schedule = LrSchedule.from_config(trainer.optim_cfg, 1, len(batches))
    trainer.net.train()
    for b in batches[:warmup]:
        trainer.train_step(*b, schedule)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        trainer.train_step(*b, schedule)
    sync()
    dt = time.perf_counter() - t0
    n = sum(b[0].shape[0] for b in batches[warmup:])
    return {"size": size, "img_size": img_size, "batch": batch, "device": str(trainer.device),
            "threads": torch.get_num_threads(), "amp": trainer.use_amp, "compiled": compile_net,
            "train_imgs_per_s": round(n / dt, 2),
            "ms_per_step": round(1000 * dt / max(len(batches) - warmup, 1), 1), "loader_imgs_per_s": round(data_ips, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    a = ap.parse_args()
    devices = a.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    n_imgs = a.batch * (a.steps + max(a.warmup, 2))  # a compiled row warms up for 2 steps
    with tempfile.TemporaryDirectory() as tmp:
        for img_size in a.sizes:
            data = os.path.join(tmp, f"shapes{img_size}")
            make_shapes_dataset(data, n_imgs, 0, seed=0, img_size=img_size)
            for device in devices:
                for compile_net in (False, True) if a.compile else (False,):
                    print(json.dumps(bench_one(data, os.path.join(tmp, "out"), a.size, img_size, a.batch, a.steps,
                                               max(a.warmup, 2 if compile_net else 0), device, a.threads,
                                               compile_net)), flush=True)


if __name__ == "__main__":
    main()
