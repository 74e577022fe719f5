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
import json
import sys
import time


def build(size: str):
    from mmdet_model import build_mmdet_rtmdet  # bench/ is sys.path[0] when this runs as a script
    return build_mmdet_rtmdet(size).eval()


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
