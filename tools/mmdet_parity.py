#!/usr/bin/env python3
"""Check this project's RTMDet forward against the real MMDetection, and refresh the stored fixture.

    .venv/bin/python tools/mmdet_parity.py --size tiny [--size m] [--img 640] [--save-fixture]

Needs ../shared/tools/mmdet_ref.py (MMDetection 3.3.0 in its own venv); this is a developer tool, not
part of the test suite. With --save-fixture it writes tests/data/parity/rtmdet_<size>.pt (the input
and MMDetection's raw outputs for seeded weights), which the default tests compare against without
MMDetection.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import build_rtmdet, save_checkpoint  # noqa: E402
from model.inference.preprocess import Normalizer, letterbox  # noqa: E402
from model.testing import fill_deterministic  # noqa: E402

MMDET_REF = ROOT.parent / "shared" / "tools" / "mmdet_ref.py"


def parity_input(img_size: int) -> torch.Tensor:
    import cv2
    photos = [cv2.imread(str(ROOT / "examples" / n)) for n in ("astronaut.jpg", "coffee.jpg")]
    canvases = [letterbox(p, img_size)[0] for p in photos]
    return Normalizer(torch.device("cpu"))(torch.from_numpy(np.stack(canvases)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", action="append", default=[])
    ap.add_argument("--img", type=int, default=640)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-fixture", action="store_true")
    args = ap.parse_args()
    worst = 0.0
    for size in args.size or ["tiny"]:
        model = fill_deterministic(build_rtmdet(size), args.seed).eval()
        x = parity_input(args.img)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, inp, out = Path(tmp, "w.pth"), Path(tmp, "x.pt"), Path(tmp, "ref.pt")
            save_checkpoint(ckpt, model.state_dict(), {})
            torch.save(x, inp)
            subprocess.check_call([sys.executable, str(MMDET_REF), "outputs", "--size", size, "--weights", str(ckpt),
                                   "--input", str(inp), "--out", str(out)])
            ref = torch.load(out, weights_only=True)
        with torch.inference_mode():
            cls, reg = model(x)
        for name, ours, theirs in (("cls", cls, ref["cls_scores"]), ("reg", reg, ref["bbox_preds"])):
            for level, (a, b) in enumerate(zip(ours, theirs)):
                diff = (a - b).abs().max().item()
                peak = b.abs().max().item()
                worst = max(worst, diff)
                print(f"{size} {name} level {level}: max |ours - mmdet| = {diff:.3g} (peak |mmdet| {peak:.3g})")
        if args.save_fixture:
            path = ROOT / "tests" / "data" / "parity" / f"rtmdet_{size}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"seed": args.seed, "input": x, "cls_scores": list(ref["cls_scores"]),
                        "bbox_preds": list(ref["bbox_preds"])}, path)
            print("wrote", path)
    print(f"worst max abs difference: {worst:.3g}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
