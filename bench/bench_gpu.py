#!/usr/bin/env python3
"""The GPU path, checked and timed: fp16, CUDA graphs per batch bucket, nvJPEG decode + letterbox on the GPU.

    .venv/bin/python bench/bench_gpu.py [--size tiny] [--batches 1 32] [--seconds 3]

Prints JSON lines, then a table, for each batch:
- network forward alone (no NMS), eager fp32 / eager fp16 / CUDA graph fp16, ms per batch: the figure to set
  beside the seed's (RTMDet-tiny 0.98 ms, TensorRT FP16, batch 1, no NMS, RTX 3090);
- the whole Detector from JPEG bytes (decode on the GPU, letterbox, forward, decode + NMS), images/s;
and checks first that the CUDA-graph outputs equal eager ones (fp16 tolerance) and that the GPU letterbox
equals the CPU one within a level or two. Needs CUDA; on a machine without it, says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_model import timed  # noqa: E402

from model import Detector, TestConfig, build_rtmdet  # noqa: E402
from model.inference.preprocess import letterbox  # noqa: E402
from model.testing import fill_deterministic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here", file=sys.stderr)
        return 2
    import cv2

    model = fill_deterministic(build_rtmdet(args.size), 0)
    with torch.no_grad():
        for conv in model.bbox_head.rtm_cls:
            conv.bias.fill_(-4.0)
    cfg = TestConfig.serving()
    dets = {
        "eager fp32": Detector(model, device="cuda", accelerate="eager", test_cfg=cfg),
        "eager fp16": Detector(model, device="cuda", fp16=True, accelerate="eager", test_cfg=cfg),
        "graph fp16": Detector(model, device="cuda", fp16=True, accelerate="cudagraph", test_cfg=cfg),
    }
    buckets = sorted(set(args.batches) | {1, 2, 4, 8, 16, 32})
    dets["graph fp16"].warmup(buckets)
    jpegs = [(ROOT / "examples" / f).read_bytes() for f in ("astronaut.jpg", "coffee.jpg")]
    bgr = [cv2.imread(str(ROOT / "examples" / f)) for f in ("astronaut.jpg", "coffee.jpg")]

    # Checks before timing.
    x, _ = dets["eager fp16"].preprocess(bgr)
    ref, got = dets["eager fp16"].forward(x), dets["graph fp16"].forward(x)  # batch 2: a captured bucket
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref[0] + ref[1], got[0] + got[1]))
    x3, _ = dets["eager fp16"].preprocess(bgr + bgr[:1])  # batch 3: padded to the 4-bucket
    ref3, got3 = dets["eager fp16"].forward(x3), dets["graph fp16"].forward(x3)
    diff3 = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref3[0] + ref3[1], got3[0] + got3[1]))
    gpu_batch, gpu_infos = dets["graph fp16"].preprocess_jpegs(jpegs)
    lb_diff = max(int(np.abs(gpu_batch[i].cpu().numpy().astype(int) - letterbox(bgr[i], 640)[0].astype(int)).max())
                  for i in range(2))
    print(json.dumps({"check": "graph vs eager fp16 max|diff|", "batch2": diff, "batch3_padded": diff3,
                      "gpu_letterbox_vs_cpu_max_levels": lb_diff,
                      "gpu_infos_equal": gpu_infos == [letterbox(b, 640)[1] for b in bgr]}), flush=True)

    rows = []
    sync = torch.cuda.synchronize
    for b in args.batches:
        row = {"size": args.size, "batch": b, "device": torch.cuda.get_device_name()}
        x, _ = dets["eager fp32"].preprocess([bgr[i % 2] for i in range(b)])
        x = x.cuda()
        for name, det in dets.items():
            row[f"forward ms {name}"] = timed(partial(det.forward, x), args.seconds, sync=sync) * 1e3
        data = [jpegs[i % 2] for i in range(b)]
        det = dets["graph fp16"]

        def end_to_end(det=det, data=data):
            batch, infos = det.preprocess_jpegs(data)
            return det.postprocess(det.forward(batch), infos)
        row["detector from JPEG img/s (graph fp16)"] = b / timed(end_to_end, args.seconds, sync=sync)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    keys = [k for k in rows[0] if k not in ("size", "device")]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    print(f"\n{rows[0]['device']}, torch {torch.__version__}; seed's figure: tiny 0.98 ms, TensorRT FP16, batch 1, "
          "no NMS, RTX 3090")
    return 0


if __name__ == "__main__":
    sys.exit(main())
