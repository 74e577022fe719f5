#!/usr/bin/env python3
"""This project's CPU runners beside ONNX Runtime, OpenVINO and MMDetection 3.3.0: one table, one run.

    .venv/bin/python bench/bench_runners.py [--sizes tiny s] [--batches 1 8] [--threads 1 2] [--seconds 2]
        [--rounds 4] [--no-mmdet] [--no-inductor] [--workload seeded|shipped|lively] [--no-sparse]

For each thread count and model size, on the same seeded weights (BatchNorm folded, 640x640, real photos):
- the runners are built once: eager and inductor (`torch.compile` with freezing) are this project's PyTorch
  paths; `onnxruntime` and `openvino` are this project's runners of those runtimes (model.inference.onnx_runners:
  a batch cut over one single-threaded stream per thread); the peers **ONNX Runtime** and **OpenVINO** are the
  same runtimes as a plain user runs them (one session / compiled model with all the threads, the whole batch
  in one call; OpenVINO with PERFORMANCE_HINT=LATENCY), all float32 on the ONNX export of the very same network
  (one dynamo-based export); MMDetection's network forward runs in its own venv (bench/mmdet_peer.py, random
  weights and input: a forward's cost depends on neither; its input is already normalised, ours is uint8).
  At 1 thread our runtime runners and the peers run the same code: their ratio is the run's noise;
- `auto` is measured as the Detector does it at start-up (model.inference.runner_choice.pick_fastest, at the
  smallest and the largest batch) from the runners already built, and the pick for each row's batch is
  reported: the project picks it by itself;
- rows `forward`: the runner alone, uint8 batch in, raw head outputs out, images/s;
- rows `detector`: decoded images to boxes (letterbox, forward, decode + NMS at serving thresholds), through
  `Detector` for each runner, the peers included (their forward plus our pre/post), and MMDetection's forward
  plus our measured pre/post time; `auto+sparse`: the Detector with sparse box regression
  (model.inference.sparse_regression: the runners run the network without its box branch, which post-processing
  runs at the candidates alone), on `auto`'s pick among those runners, its detections checked equal to eager's.
  How many boxes pass the serving threshold decides what sparse regression saves: `--workload` picks the seeded
  weights on photos (almost none: its best case), the shipped shapes model on drawn scenes (a few real ones an
  image) or lively random weights (~100 an image, 1000 candidates: its worst case here); the table says how many.
Every runner of a row is timed in `--rounds` alternating rounds of equal calls (the peer's calls in turn with
ours), so all see the same load on a shared machine; the median per call decides. glibc's malloc keeps freed
blocks (model.inference.allocator.keep_freed_memory), as in `rtmdet serve`. Threads: torch, ONNX
Runtime's intra-op pool, OpenVINO's INFERENCE_NUM_THREADS and the peer's torch are all set to the same count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_model import machine_line, photos  # noqa: E402
from bench_vs_mmdet import MMDET_PY, MMDetPeer  # noqa: E402

from model import Detector, TestConfig, build_rtmdet  # noqa: E402
from model.inference.accelerate import EagerRunner, InductorRunner, fast_eager  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from model.inference.onnx_runners import OnnxRuntimeRunner, OpenVINORunner, export_network  # noqa: E402
from model.inference.runner_choice import nearest_size, peak_relative_error, pick_fastest  # noqa: E402
from model.inference.streams import with_streams  # noqa: E402
from model.testing import fill_deterministic  # noqa: E402

OURS = ("eager", "inductor", "onnxruntime", "openvino")
REFERENCE = "reference"
PEERS = ("ort_plain", "ov_plain")


class SelfTimed:
    """A call that reports its own time (the MMDetection peer times its forward in its process)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self) -> list[float]:
        return self.fn()


def interleaved(calls: dict[str, object], seconds: float, rounds: int) -> dict[str, float]:
    """Median seconds per call of each callable (None: skipped), timed in alternating rounds of equal calls."""
    live = {k: f for k, f in calls.items() if f is not None}
    probe = {}
    for name, f in live.items():
        f()  # warm
        t0 = time.perf_counter()
        out = f()
        probe[name] = statistics.median(out) if isinstance(f, SelfTimed) else time.perf_counter() - t0
    per_round = max(1, round(seconds / rounds / max(max(probe.values()), 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in live}
    for r in range(rounds):
        order = list(live) if r % 2 == 0 else list(reversed(live))  # who goes first alternates
        for name in order:
            for _ in range(per_round):
                t0 = time.perf_counter()
                out = live[name]()
                times[name] += out if isinstance(live[name], SelfTimed) else [time.perf_counter() - t0]
    return {k: statistics.median(v) for k, v in times.items()}


def build_model(size: str):
    model = fill_deterministic(build_rtmdet(size), 0)
    with torch.no_grad():  # a realistic score distribution: most priors are background
        for conv in model.bbox_head.rtm_cls:
            conv.bias.fill_(-4.0)
    return model.eval()


def runners_for(det: Detector, threads: int, inductor: bool, peers: bool = True,
                any_canvas: bool = False) -> dict[str, object]:
    """Every runner of `det.engine_network` (the whole network, or without its box branch with sparse
    regression); the plain runtimes too with `peers`, always on a square-only export, as a plain user has it.
    `any_canvas`: our runtime runners' export takes any height and width (the tight canvas)."""
    net = det.engine_network
    # `reference`: plain eager, what every runner's outputs are checked against (not timed); eager and inductor
    # as the Detector builds them on the CPU (Winograd convolutions, a batch over one-thread streams).
    reference = EagerRunner(net, det.normalize)
    out: dict[str, object] = {
        REFERENCE: reference, "eager": with_streams(fast_eager(reference), threads),
        "inductor": with_streams(InductorRunner(net, det.normalize), threads) if inductor else None}
    with export_network(net, det.strides, det.input_size, any_canvas) as path:
        out["onnxruntime"] = OnnxRuntimeRunner(path, threads)
        out["openvino"] = OpenVINORunner(path, threads)
    if peers:
        with export_network(net, det.strides, det.input_size) as path:
            out["ort_plain"] = OnnxRuntimeRunner(path, threads, streams=1)
            out["ov_plain"] = OpenVINORunner(path, threads, streams=1)
    return out


def auto_pick(runners: dict[str, object], examples: list[torch.Tensor], threads: int):
    """The start-up choice, as `Detector(accelerate="auto")` makes it after a warm-up of these batch sizes (the
    smallest and the largest are measured), from runners already built."""
    return pick_fastest(runners[REFERENCE], {k: (lambda r=r: r) for k, r in runners.items()
                                             if k in OURS and k != "eager" and r is not None}, examples, threads)[1]


def workload(name: str, size: str, input_size: int):
    """(model, class names, images(batch)) of a workload: `seeded` weights on photos (almost no box passes the
    serving threshold), the `shipped` shapes model on drawn shapes scenes (a few real detections an image), or
    `lively` random weights on photos (~100 boxes an image: the box branch's worst case here)."""
    if name == "seeded":
        return build_model(size), None, photos
    if name == "lively":
        from bench_service import lively_random_model

        return lively_random_model(size).eval(), None, photos
    if size != "tiny":
        raise SystemExit("--workload shipped is RTMDet-tiny: add --sizes tiny")
    from model.data.shapes import ShapesConfig, _load_photos, draw_shapes_image
    from model.inference.detector import load_torch_network

    model, names, _ = load_torch_network(ROOT / "weights" / "rtmdet_tiny_shapes.pth", "tiny")
    rng, backgrounds = np.random.default_rng(4242), _load_photos()  # a seed the training never saw
    scenes = [draw_shapes_image(rng, ShapesConfig(img_size=input_size), backgrounds)[0] for _ in range(8)]
    return model.eval(), names, lambda n: [scenes[i % len(scenes)] for i in range(n)]


def bench_size(size: str, threads: int, batches: list[int], seconds: float, rounds: int, peer: MMDetPeer | None,
               inductor: bool, input_size: int = 640, load: str = "seeded", sparse: bool = True) -> list[dict]:
    torch.set_num_threads(threads)
    cfg = TestConfig.serving(input_size=input_size)
    model, names, images = workload(load, size, input_size)
    base = Detector(model, names, device="cpu", test_cfg=cfg, accelerate="eager")
    t0 = time.perf_counter()
    runners = runners_for(base, threads, inductor)
    build_s = time.perf_counter() - t0
    examples = [base.preprocess(images(b))[0] for b in sorted({min(batches), max(batches)})]
    choice = auto_pick(runners, examples, threads)
    dets = {}
    for name, runner in runners.items():
        if runner is not None and name != REFERENCE:
            d = Detector(model, names, device="cpu", test_cfg=cfg, accelerate="eager")
            d.set_runner(runner, name)
            dets[name] = d
    # Sparse regression: the same runners of the network without its box branch, `auto`'s pick among them, and
    # the Detector that runs the box branch at the candidates alone.
    sparse_choice = None
    if sparse:
        sparse_base = Detector(model, names, device="cpu", test_cfg=cfg, accelerate="eager", sparse_regression=True)
        sparse_runners = runners_for(sparse_base, threads, inductor, peers=False)
        sparse_choice = auto_pick(sparse_runners, examples, threads)
    print(json.dumps({"size": size, "threads": threads, "workload": load, "build_s": round(build_s, 1),
                      "auto": choice.summary(), "auto_sparse": sparse_choice and sparse_choice.summary()}),
          flush=True)
    rows = []
    for b in batches:
        imgs = images(b)
        x, infos = base.preprocess(imgs)
        timed = {k: r for k, r in runners.items() if r is not None and k != REFERENCE}
        ref = runners[REFERENCE](x)
        errors = {k: peak_relative_error(r(x), ref) for k, r in timed.items()}
        peer_fwd = SelfTimed(partial(peer.forward_times, size, b, 1)) if peer else None
        fwd = interleaved({**{k: partial(r, x) for k, r in timed.items()}, "mmdet": peer_fwd}, seconds, rounds)
        pre = interleaved({"pre": partial(base.preprocess, imgs),
                           "post": partial(base.postprocess, base.forward(x), infos, cfg)}, seconds / 4, 2)
        calls = {**{k: partial(d, imgs) for k, d in dets.items()}, "mmdet": peer_fwd}
        want = dets["eager"](imgs)
        auto_sparse = None
        if sparse_choice is not None:
            auto_sparse = sparse_choice.by_batch[nearest_size(list(sparse_choice.by_batch), b)]
            d = Detector(model, names, device="cpu", test_cfg=cfg, accelerate="eager", sparse_regression=True)
            d.set_runner(sparse_runners[auto_sparse], auto_sparse)
            same = [len(p.boxes) == len(q.boxes) and np.allclose(p.boxes, q.boxes, atol=1e-3)
                    for p, q in zip(d(imgs), want)]
            if not all(same):
                raise SystemExit(f"sparse regression changed the detections ({size}, batch {b})")
            calls["auto+sparse"] = partial(d, imgs)
        whole = interleaved(calls, seconds, rounds)
        if "mmdet" in whole:  # their forward plus our pre/post
            whole["mmdet"] += pre["pre"] + pre["post"]
        common = {"size": size, "batch": b, "threads": threads, "workload": load,
                  "auto": choice.by_batch[nearest_size(list(choice.by_batch), b)]}
        rows.append({"what": "forward", **common, **{k: b / v for k, v in fwd.items()},
                     "max_peak_rel_error": max(errors.values())})
        rows.append({"what": "detector", **common, **{k: b / v for k, v in whole.items()},
                     "pre_ms": pre["pre"] * 1e3, "post_ms": pre["post"] * 1e3, "auto_sparse": auto_sparse,
                     "boxes_per_image": sum(len(o.boxes) for o in want) / b})
        for r in rows[-2:]:
            print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    return rows


def fmt(v, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def over_best_peer(row: dict, key: str) -> float | None:
    best = max(row.get(k) or 0.0 for k in PEERS)
    value = row.get(key)
    return value / best if value and best else None


def print_table(rows: list[dict]) -> None:
    head = ("what", "workload", "size", "batch", "threads", "eager", "inductor", "onnxruntime", "openvino",
            "ONNX Runtime", "OpenVINO", "MMDetection", "auto picks", "inductor / best peer", "auto / best peer",
            "boxes / image", "auto+sparse", "auto+sparse / best peer")
    print("\nimages/s (higher is better); onnxruntime, openvino: this project's runners of them (streams); ONNX "
          "Runtime, OpenVINO: the plain runtimes; best peer = the faster of those two in that row; auto+sparse: "
          "the Detector with sparse box regression on auto's pick among the runners of the network without "
          "its box branch (detector rows)")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        sparse = f"{fmt(r['auto+sparse'])} ({r['auto_sparse']})" if r.get("auto+sparse") else "n/a"
        print(f"| {r['what']} | {r['workload']} | {r['size']} | {r['batch']} | {r['threads']} | " + " | ".join(
            fmt(r.get(k)) for k in (*OURS, *PEERS, "mmdet")) +
            f" | {r['auto']} | {fmt(over_best_peer(r, 'inductor'), '.2f', 'x')} | "
            f"{fmt(over_best_peer(r, r['auto']), '.2f', 'x')} | {fmt(r.get('boxes_per_image'), '.1f')} | "
            f"{sparse} | "
            f"{fmt(over_best_peer(r, 'auto+sparse'), '.2f', 'x')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seconds", type=float, default=2.0, help="per runner per row, over all rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-mmdet", action="store_true")
    ap.add_argument("--no-inductor", action="store_true", help="skip the inductor compiles (~20-60 s each)")
    ap.add_argument("--input-size", type=int, default=640, help="letterbox size (the table's figures: 640)")
    ap.add_argument("--workload", choices=("seeded", "shipped", "lively"), default="seeded",
                    help="seeded weights on photos (no box passes 0.3), the shipped shapes model on shapes scenes "
                         "(tiny only), or lively random weights (~100 boxes an image)")
    ap.add_argument("--no-sparse", action="store_true", help="skip the auto+sparse column (no second build)")
    args = ap.parse_args()
    keep_freed_memory()  # as `rtmdet serve` runs (model.inference.allocator); ORT and OpenVINO have arenas
    if args.input_size != 640 and not args.no_mmdet:
        ap.error("the MMDetection peer runs at 640: add --no-mmdet for another --input-size")
    use_mmdet = not args.no_mmdet and MMDET_PY.is_file()
    if not use_mmdet and not args.no_mmdet:
        print(f"MMDetection not found ({MMDET_PY}): its column reads n/a", file=sys.stderr)
    rows = []
    for threads in args.threads:
        peer = MMDetPeer(threads) if use_mmdet else None
        try:
            for size in args.sizes:
                rows += bench_size(size, threads, args.batches, args.seconds, args.rounds, peer,
                                   not args.no_inductor, args.input_size, args.workload, not args.no_sparse)
        finally:
            if peer is not None:
                peer.close()
    print_table(rows)
    import onnxruntime
    import openvino

    print(f"\n{machine_line()}; onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__} "
          f"(MMDetection's venv: its own torch); {args.input_size}x{args.input_size}, workload {args.workload}, "
          "BatchNorm folded, channels_last for torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
