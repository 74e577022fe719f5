#!/usr/bin/env python3
"""A long-lived MMDetection 3.3.0 forward timer, run in its own venv, driven over stdin/stdout.

bench/bench_vs_mmdet.py starts it once per thread count and asks for a few forwards at a time, in turn with
its own measurements, so both sides see the same load on a shared machine (a one-shot peer run minutes
apart can land in a quieter or busier moment). Protocol: one JSON request per line,
  {"size": "tiny", "batch": 8, "img": 640, "n": 3}
answered by one JSON line {"times": [seconds per forward, ...]}. The first request for a shape runs two
untimed forwards first. The network is built from MMDetection's own config (random weights: the forward's
cost does not depend on them); input is random (its cost does not depend on the pixels either).

  /tmp/mmdet-ref-venv/bin/python bench/mmdet_peer.py --threads 1
"""
import argparse
import glob
import json
import os
import sys
import time
import types


def build(size: str):
    class _Raise(types.ModuleType):  # mmcv-lite has no compiled ops; the forward needs none
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)

            def op(*a, **k):
                raise NotImplementedError(f"mmcv compiled op {name} is not available here")
            return op
    sys.modules.setdefault("mmcv._ext", _Raise("mmcv._ext"))
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    register_all_modules(init_default_scope=True)
    cfg_dir = glob.glob(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "rtmdet"))[0]
    cfg = Config.fromfile(os.path.join(cfg_dir, f"rtmdet_{size}_8xb32-300e_coco.py"))
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    models, inputs = {}, {}
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["size"] not in models:
            models[req["size"]] = build(req["size"])
        model = models[req["size"]]
        key = (req["size"], req["batch"], req["img"])
        with torch.inference_mode():
            if key not in inputs:
                inputs[key] = torch.randn(req["batch"], 3, req["img"], req["img"])
                for _ in range(2):
                    model._forward(inputs[key])
            times = []
            for _ in range(req["n"]):
                t0 = time.perf_counter()
                model._forward(inputs[key])
                times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), flush=True)


if __name__ == "__main__":
    main()
