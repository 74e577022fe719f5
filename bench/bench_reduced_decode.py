#!/usr/bin/env python3
"""Full vs reduced-scale JPEG decoding (`RTMDET_REDUCED_DECODE`): decode time, memory, and the accuracy it costs.

    .venv/bin/python bench/bench_reduced_decode.py [--img-sizes 320 1280 2560 4032] [--n-val 100] [--rounds 3]

For each image size, writes the shapes validation set drawn at that size (objects scale with the image: the same
scenes, more pixels), then runs the shipped shapes model (served at its training size, 320) on every image
twice: decoded whole (`fit=None`) and decoded to fit (`fit=input size`), both through the service's own
`decode_image_to_fit` and letterbox, boxes mapped back to the original's pixels. Prints, per size and mode, the
median decode time of one image (the two modes alternate image by image, `--rounds` times), the decoded pixels,
COCO mAP / mAP50 on the set, and the largest box-corner difference between the two modes as a share of the
image's long side. One process, one thread for torch (what a decode thread costs, not the forward).

    .venv/bin/python bench/bench_reduced_decode.py --service [--photo-size 4032 3024] [--concurrency 8]
        [--duration 20] [--rounds 3] [--input-size 320]

The service side by side: two `rtmdet serve` processes on the shipped model, one with `RTMDET_REDUCED_DECODE`
true and one false, load over HTTP (closed loop, bench_service's clients) with one photo-sized JPEG (a bundled
photo enlarged to `--photo-size`, quality 90), the two servers taking turns window by window. Prints img/s, p50,
p99 and the server's CPU time per image, per server, medians over the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from model import Detector, TestConfig  # noqa: E402
from model.data.coco_eval import evaluate_coco  # noqa: E402
from model.data.shapes import make_shapes_dataset  # noqa: E402
from service.imaging import DecodedImage, decode_image_to_fit  # noqa: E402
from service.pipeline import letterbox_decoded  # noqa: E402
from service.settings import DEFAULT_WEIGHTS  # noqa: E402

NO_LIMIT = 1 << 40


def detect(det: Detector, decoded: DecodedImage):
    batch, infos = letterbox_decoded(det, decoded)  # the service's own step
    d = det.postprocess(det.forward(batch), infos, TestConfig(input_size=det.input_size))[0]  # evaluation thresholds
    return d.boxes, d.scores, d.labels


def scenes(work: Path, img_size: int, n_val: int, how: str) -> tuple[Path, dict[int, bytes]]:
    """The validation JPEGs at `img_size` and their annotation file. `drawn`: the set drawn at that size (its own
    textures and edges at full resolution); `upscaled`: the 320 set enlarged (bicubic) and re-encoded, its boxes
    scaled, so the model sees its own training scenes and only the decode path differs."""
    if how == "drawn":
        ann = make_shapes_dataset(work / f"drawn{img_size}", 0, n_val, seed=7, img_size=img_size)["val"]
        coco = json.loads(ann.read_text())
        return ann, {im["id"]: (ann.parent.parent / "val" / im["file_name"]).read_bytes() for im in coco["images"]}
    base = make_shapes_dataset(work / "drawn320", 0, n_val, seed=7, img_size=320)["val"]
    coco = json.loads(base.read_text())
    datas = {}
    for im in coco["images"]:
        img = cv2.imread(str(base.parent.parent / "val" / im["file_name"]))
        f = img_size / max(img.shape[:2])
        big = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_CUBIC)
        datas[im["id"]] = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
        im["height"], im["width"] = big.shape[:2]
        im["scale"] = f
    scale = {im["id"]: im.pop("scale") for im in coco["images"]}
    for a in coco["annotations"]:
        f = scale[a["image_id"]]
        a["bbox"] = [v * f for v in a["bbox"]]
        a["area"] = a["area"] * f * f
    ann = work / f"upscaled{img_size}.json"
    ann.write_text(json.dumps(coco))
    return ann, datas


def matched_iou(a: tuple, b: tuple, thr: float = 0.3) -> list[float]:
    """For each confident box of `a`, its best IoU with a confident box of `b` of the same label (0 if none)."""
    out = []
    for box, score, label in zip(*a):
        if score < thr:
            continue
        best = 0.0
        for other, s2, l2 in zip(*b):
            if s2 >= thr and l2 == label:
                best = max(best, float(box_iou(torch.as_tensor(box)[None], torch.as_tensor(other)[None])))
        out.append(best)
    return out


def run_size(det: Detector, img_size: int, n_val: int, rounds: int, work: Path, how: str) -> list[dict]:
    from pycocotools.coco import COCO

    ann, datas = scenes(work, img_size, n_val, how)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    modes = {"full": None, "reduced": det.input_size}
    times: dict[str, list[float]] = {m: [] for m in modes}
    pixels: dict[str, list[int]] = {m: [] for m in modes}
    results: dict[str, dict] = {m: {} for m in modes}
    ious: list[float] = []
    for r in range(rounds):
        for image_id, data in datas.items():
            order = list(modes) if (image_id + r) % 2 == 0 else list(reversed(modes))
            decoded = {}
            for m in order:
                t0 = time.perf_counter()
                decoded[m] = decode_image_to_fit(data, NO_LIMIT, NO_LIMIT, modes[m])
                times[m].append(time.perf_counter() - t0)
            if r > 0:
                continue
            for m in modes:
                pixels[m].append(decoded[m].image.shape[0] * decoded[m].image.shape[1])
                results[m][image_id] = detect(det, decoded[m])
            ious += matched_iou(results["full"][image_id], results["reduced"][image_id])
    rows = []
    for m in modes:
        stats = evaluate_coco(coco, results[m])
        rows.append({"how": how, "size": img_size, "mode": m, "decode_ms": 1e3 * statistics.median(times[m]),
                     "mpix": statistics.mean(pixels[m]) / 1e6, "map": stats["AP"], "map50": stats["AP50"],
                     "iou": (statistics.median(ious), min(ious), len(ious)) if ious else None})
    return rows


def photo_jpeg(width: int, height: int) -> bytes:
    from skimage import data

    img = cv2.resize(np.ascontiguousarray(data.astronaut()[..., ::-1]), (width, height),
                     interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def service_side_by_side(args) -> int:
    import asyncio
    import os
    import signal
    from types import SimpleNamespace

    sys.path.insert(0, str(BENCH))
    from bench_service import CpuWindow, load_http, percentiles, start_server

    data = photo_jpeg(*args.photo_size)
    print(f"photo {args.photo_size[0]}x{args.photo_size[1]} JPEG ({len(data) / 1e6:.1f} MB), {args.weights.name} "
          f"at {args.input_size}, HTTP concurrency {args.concurrency}, {args.duration:.0f} s windows, "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs")
    servers = {}
    opts = SimpleNamespace(input_size=args.input_size, batch=8, accelerate=None, size="tiny")
    try:
        for mode, flag in (("reduced", "true"), ("full", "false")):
            os.environ["RTMDET_REDUCED_DECODE"] = flag  # inherited by that server only (started now)
            servers[mode] = start_server(args.weights, opts)
        os.environ.pop("RTMDET_REDUCED_DECODE")
        got: dict[str, list[dict]] = {m: [] for m in servers}
        for r in range(args.rounds):
            for mode in (list(servers) if r % 2 == 0 else list(reversed(servers))):
                proc, http, _ = servers[mode]
                cpu = CpuWindow(proc.pid)
                ips, lat, errors = asyncio.run(load_http(f"{http}/detect", data, args.concurrency, 3.0,
                                                         args.duration, cpu))
                p50, _, p99 = percentiles(lat)
                got[mode].append({"ips": ips, "p50": p50, "p99": p99, "errors": errors,
                                  "cpu_ms": 1e3 * cpu.server_s / max(len(lat), 1)})
                print(f"round {r + 1} {mode}: {ips:.2f} img/s, p50 {p50:.0f} ms", flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print("| decode | img/s | p50 ms | p99 ms | server CPU ms / image | errors |")
    print("|---|---|---|---|---|---|")
    for mode, rows in got.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("ips", "p50", "p99", "cpu_ms")}
        print(f"| {mode} | {med['ips']:.2f} | {med['p50']:.0f} | {med['p99']:.0f} | {med['cpu_ms']:.0f} | "
              f"{sum(x['errors'] for x in rows)} |")
    ratio = statistics.median(got["reduced"][i]["ips"] / got["full"][i]["ips"] for i in range(args.rounds))
    print(f"reduced / full throughput: {ratio:.2f}x (median of the rounds' ratios)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--img-sizes", type=int, nargs="+", default=[320, 1280, 2560, 4032])
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenes", nargs="+", choices=["upscaled", "drawn"], default=["upscaled", "drawn"])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--service", action="store_true", help="time two real servers instead (see above)")
    ap.add_argument("--photo-size", type=int, nargs=2, default=[4032, 3024], metavar=("W", "H"))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--input-size", type=int, default=320)
    args = ap.parse_args()
    if args.service:
        return service_side_by_side(args)
    torch.set_num_threads(1)
    det = Detector.from_checkpoint(args.weights)
    print(f"model {args.weights.name}, input {det.input_size}; shapes val, {args.n_val} images per size")
    print("| scenes | long side | decode | decode ms (median) | decoded Mpx | mAP | mAP50 | "
          "IoU with full's boxes (median / min, n) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for how in args.scenes:
            for size in args.img_sizes:
                for row in run_size(det, size, args.n_val, args.rounds, Path(tmp), how):
                    iou = "—" if row["mode"] == "full" or row["iou"] is None else \
                        "{:.3f} / {:.3f}, {}".format(*row["iou"])
                    print(f"| {how} | {row['size']} | {row['mode']} | {row['decode_ms']:.2f} | {row['mpix']:.2f} | "
                          f"{row['map']:.4f} | {row['map50']:.4f} | {iou} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
