#!/usr/bin/env python3
"""Check `RTMDetSepBNHead.loss` against MMDetection 3.3.0's `RTMDetHead.loss_by_feat` on the same inputs.

  .venv/bin/python bench/mmdet_loss_parity.py [--save tests/data/loss_parity_tiny.pt]

Makes a few random cases (head outputs of an RTMDet-tiny-shaped head at a small input size, with GT boxes),
runs MMDetection's loss in its own venv (/tmp/mmdet-ref-venv, built by /work/shared/tools/mmdet_ref.py), and
prints the largest absolute differences of the losses and of their gradients w.r.t. the head outputs.
With --save it stores inputs and MMDetection's outputs so the default test suite can check parity
without MMDetection (tests/model/train/test_loss_parity.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

MMDET_PY = os.path.join(os.environ.get("MMDET_VENV", "/tmp/mmdet-ref-venv"), "bin", "python")


def make_cases(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    specs = [  # (input size, GT boxes per image, logit offset); one image without GT in the last case
        (160, [3, 5], 0.0),
        (128, [1, 8], 2.0),
        (96, [0, 2], -1.0),
        (192, [12, 4], 1.0),
    ]
    for size, n_gts, offset in specs:
        b = len(n_gts)
        cls, reg = [], []
        for stride in (8, 16, 32):
            h = w = size // stride
            cls.append(torch.randn(b, 80, h, w, generator=g) * 1.5 - 3.0 + offset)
            # Distances around 0.5-4 strides; a few negative ones (tiny/s predictions are linear).
            reg.append((torch.rand(b, 4, h, w, generator=g) * 3.5 + 0.5 - (torch.rand(b, 4, h, w, generator=g) < 0.03)
                        * 5.0) * stride)
        boxes, labels = [], []
        for n in n_gts:
            xy = torch.rand(n, 2, generator=g) * size * 0.7
            wh = torch.rand(n, 2, generator=g) * size * 0.5 + 6
            bx = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
            boxes.append(bx)
            labels.append(torch.randint(0, 5, (n,), generator=g))  # few classes: repeated classes in one image
        cases.append({"size": size, "cls_scores": cls, "bbox_preds": reg, "gt_boxes": boxes, "gt_labels": labels})
    return cases


def run_ours(case: dict) -> dict:
    from model import build_rtmdet
    head = build_rtmdet("tiny").bbox_head
    cls = [c.clone().requires_grad_(True) for c in case["cls_scores"]]
    reg = [r.clone().requires_grad_(True) for r in case["bbox_preds"]]
    out = head.loss(cls, reg, case["gt_boxes"], case["gt_labels"])
    total = sum(out["loss_cls"]) + sum(out["loss_bbox"])
    total.backward()
    return {"loss_cls": [v.detach() for v in out["loss_cls"]], "loss_bbox": [v.detach() for v in out["loss_bbox"]],
            "grad_cls": [c.grad for c in cls], "grad_reg": [r.grad for r in reg]}


def mmdet_main(inp: str, out_path: str) -> None:  # runs inside the MMDetection venv
    from mmdet_model import build_mmdet_rtmdet  # bench/ is sys.path[0] when this runs as a script
    from mmengine.structures import InstanceData
    head = build_mmdet_rtmdet("tiny").bbox_head
    results = []
    for case in torch.load(inp, weights_only=True):
        cls = [c.clone().requires_grad_(True) for c in case["cls_scores"]]
        reg = [r.clone().requires_grad_(True) for r in case["bbox_preds"]]
        gts = [InstanceData(bboxes=b, labels=lab) for b, lab in zip(case["gt_boxes"], case["gt_labels"], strict=True)]
        metas = [{"img_shape": (case["size"], case["size"]), "pad_shape": (case["size"], case["size"])}] * len(gts)
        out = head.loss_by_feat(cls, reg, gts, metas)
        (sum(out["loss_cls"]) + sum(out["loss_bbox"])).backward()
        results.append({"loss_cls": [v.detach() for v in out["loss_cls"]],
                        "loss_bbox": [v.detach() for v in out["loss_bbox"]],
                        "grad_cls": [c.grad for c in cls], "grad_reg": [r.grad for r in reg]})
    torch.save(results, out_path)


def max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: max(float((x - y).abs().max()) for x, y in zip(a[k], b[k], strict=True)) for k in a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", help="write inputs + MMDetection outputs here (a small .pt of tensors)")
    ap.add_argument("--mmdet-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mmdet_child:
        mmdet_main(*a.mmdet_child)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = make_cases()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save(cases, inp)
        subprocess.check_call([MMDET_PY, os.path.abspath(__file__), "--mmdet-child", inp, out])
        ref = torch.load(out, weights_only=True)
    worst: dict[str, float] = {}
    for i, (case, r) in enumerate(zip(cases, ref, strict=True)):
        d = max_diff(r, run_ours(case))
        print(f"case {i}: size {case['size']} gts {[len(b) for b in case['gt_boxes']]} "
              f"mmdet loss_cls {[round(float(v), 5) for v in r['loss_cls']]} "
              f"loss_bbox {[round(float(v), 5) for v in r['loss_bbox']]} max|diff| "
              + " ".join(f"{k}={v:.2e}" for k, v in d.items()))
        for k, v in d.items():
            worst[k] = max(worst.get(k, 0.0), v)
    print("worst max|diff|: " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    if a.save:
        torch.save({"cases": cases, "mmdet": ref}, a.save)
        print(f"saved {a.save} ({os.path.getsize(a.save) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
