#!/usr/bin/env python3
"""MMDetection 3.3.0's RTMDet training step, timed in its own venv on batches this project prepared.

Run by bench/bench_vs_mmdet.py (not imported: it needs MMDetection, which lives in /tmp/mmdet-ref-venv):

  /tmp/mmdet-ref-venv/bin/python bench/mmdet_train_step.py --batches b.pt --size tiny --num-classes 3 \
      --threads 1 --warmup 1            # all steps, one JSON line
  ... --serve                            # one step per stdin line {"step": i} -> {"seconds": t}

With --serve the caller alternates its own steps with these, so both see the same machine load.

`b.pt` holds [{"imgs": normalised float B x 3 x H x W, "boxes": [(Ni, 4) xyxy], "labels": [(Ni,)]}, ...].
One step = backbone + neck + head forward, `RTMDetHead.loss_by_feat` (DynamicSoftLabelAssigner, QFL, GIoU),
backward, AdamW (lr 0.004, weight decay 0.05, as the official config). Prints one JSON line.
mmcv-lite has no compiled ops; the training step does not need them, so they are replaced by ones that raise
(as /work/shared/tools/mmdet_ref.py does).
"""
import argparse
import json
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", required=True)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from mmdet_model import build_mmdet_rtmdet  # bench/ is sys.path[0] when this runs as a script
    from mmengine.structures import InstanceData
    model = build_mmdet_rtmdet(a.size, a.num_classes)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.004, weight_decay=0.05)
    batches = torch.load(a.batches, weights_only=True)

    def step(b: dict) -> float:
        x = b["imgs"]
        h, w = x.shape[-2:]
        cls, reg = model.bbox_head(model.extract_feat(x))
        gts = [InstanceData(bboxes=bx, labels=lb) for bx, lb in zip(b["boxes"], b["labels"])]
        metas = [{"img_shape": (h, w), "pad_shape": (h, w)}] * len(gts)
        losses = model.bbox_head.loss_by_feat(cls, reg, gts, metas)
        loss = sum(losses["loss_cls"]) + sum(losses["loss_bbox"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    if a.serve:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            t0 = time.perf_counter()
            step(batches[json.loads(line)["step"]])
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        return
    for b in batches[:a.warmup]:
        step(b)
    times = []
    for b in batches[a.warmup:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n = batches[0]["imgs"].shape[0]
    print(json.dumps({"peer": "mmdet-3.3.0", "size": a.size, "batch": n, "img": int(batches[0]["imgs"].shape[-1]),
                      "threads": torch.get_num_threads(), "steps": len(times), "ms_per_step": round(med * 1e3, 1),
                      "img_per_s": round(n / med, 2)}))


if __name__ == "__main__":
    main()
