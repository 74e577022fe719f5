#!/usr/bin/env python3
"""`make gpu-check`: every CUDA path checked against its CPU/eager twin, timed, trained and served, in one run.

    .venv/bin/python bench/gpu_check.py [--budget-s 450] [--sizes tiny s] [--batches 1 8 32] [--requests 200]

On a machine with CUDA, in under 8 minutes (a deadline is kept: a section that would start past it is
reported as skipped, never left hanging):
1. checks, each against its twin, relative to each output's peak (as the export and runner checks):
   - eager fp32 on CUDA vs eager fp32 on the CPU (TF32 off for the check), bound 1e-3 (cuDNN's kernels);
   - CUDA graphs fp32 vs eager fp32 on CUDA, at a captured batch (2) and a padded one (3 -> bucket 4), 1e-3;
   - eager fp16 and CUDA graphs fp16 vs eager fp32 on the CPU, bound 1e-2 (half precision, as `rtmdet export
     --fp16`'s check);
   - nvJPEG decode + letterbox on the GPU (model/inference/device_preprocess.py) vs cv2 on the CPU: mean
     difference <= 1 level and 99th percentile <= 3 (nvJPEG's IDCT and float resize vs libjpeg-turbo and cv2's
     fixed point), identical letterbox infos;
   - an AMP training step (fp16 autocast + GradScaler) on CUDA vs the same step in fp32 on the CPU from the same
     weights and batch: losses within 5% (fp16 forward; the assigner's near-ties may flip);
   - NCCL DDP: two processes training two iterations through `torch.distributed.run`, if there are >= 2 GPUs
     (else skipped, with a message);
2. times tiny and s at batch 1/8/32: the network forward alone (eager fp32, eager fp16, CUDA graphs fp16; ms
   per batch, no NMS) and the whole Detector from JPEG bytes (nvJPEG, GPU letterbox, CUDA graphs fp16, decode
   + NMS; images/s);
3. runs 20 AMP training steps of tiny at 640, batch 16 (images/s; losses finite);
4. starts `python -m service serve --device cuda`, sends 200 requests over HTTP (8 at a time), checks every
   answer is a 200 with detections, and prints the latencies;
then one table beside the seed's figure (RTMDet-tiny 0.98 ms, TensorRT FP16, batch 1, RTX 3090, no NMS).
Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

T0 = time.monotonic()  # the deadline counts from the start, imports included
SEED_FIGURE = "RTMDet-tiny 0.98 ms per image (TensorRT FP16, batch 1, no NMS, RTX 3090)"
PHOTO_FILES = ("astronaut.jpg", "coffee.jpg")


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL, SKIP
    figure: str = ""
    bound: str = ""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = T0 + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(**fields) -> None:
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in fields.items()}), flush=True)


def seeded_model(size: str):
    from model import build_rtmdet
    from model.testing import fill_deterministic

    model = fill_deterministic(build_rtmdet(size), 0)
    with torch.no_grad():  # logits of a real detector's spread, and mostly background
        for conv in model.bbox_head.rtm_cls:
            conv.weight.mul_(30.0)
            conv.bias.fill_(-4.0)
    return model.eval()


def heads(det, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    cls, reg = det.forward(x)
    return [c.float().cpu() for c in cls], [r.float().cpu() for r in reg]


def bound_check(name: str, err: float, bound: float) -> Check:
    return Check(name, "PASS" if err <= bound else "FAIL", f"{err:.2e} of peak", f"<= {bound:.0e}")


def check_network_paths(bgr: list[np.ndarray]) -> list[Check]:
    from model import Detector, TestConfig
    from model.inference.runner_choice import peak_relative_error

    model = seeded_model("tiny")
    cfg = TestConfig.serving()
    cpu = Detector(model, device="cpu", test_cfg=cfg)
    out = []
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        eager32 = Detector(model, device="cuda", accelerate="eager", test_cfg=cfg)
        graph32 = Detector(model, device="cuda", accelerate="cudagraph", test_cfg=cfg)
        graph32.warmup([1, 2, 4])
        x2, _ = cpu.preprocess(bgr)
        x3, _ = cpu.preprocess(bgr + bgr[:1])
        ref2, ref3 = heads(cpu, x2), heads(cpu, x3)
        e2, e3 = heads(eager32, x2), heads(eager32, x3)
        # 1e-3, not the CPU runners' 1e-4: cuDNN (benchmark mode) may pick Winograd or FFT kernels, whose
        # float32 error is ~1e-5 to 1e-4 of the peak; a real fault (layout, normalisation) is >= 1e-2.
        out.append(bound_check("eager fp32 CUDA vs CPU", peak_relative_error(e2, ref2), 1e-3))
        out.append(bound_check("CUDA graph fp32 vs eager CUDA, batch 2", peak_relative_error(heads(graph32, x2), e2),
                               1e-3))
        out.append(bound_check("CUDA graph fp32 vs eager CUDA, batch 3 padded to 4",
                               peak_relative_error(heads(graph32, x3), e3), 1e-3))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    eager16 = Detector(model, device="cuda", fp16=True, accelerate="eager", test_cfg=cfg)
    graph16 = Detector(model, device="cuda", fp16=True, test_cfg=cfg)  # the CUDA default: graphs
    graph16.warmup([1, 2, 4])
    out.append(bound_check("eager fp16 CUDA vs fp32 CPU", peak_relative_error(heads(eager16, x2), ref2), 1e-2))
    out.append(bound_check("CUDA graph fp16 vs fp32 CPU, batch 3 padded", peak_relative_error(heads(graph16, x3),
                                                                                           ref3), 1e-2))
    return out


def check_device_preprocess(jpegs: list[bytes], bgr: list[np.ndarray]) -> list[Check]:
    from model.inference.device_preprocess import preprocess_jpegs
    from model.inference.preprocess import letterbox

    out = []
    for size in (320, 640):
        batch, infos = preprocess_jpegs(jpegs, size, "cuda")
        assert batch.is_cuda, "the letterboxed batch should stay on the GPU"
        ref = [letterbox(img, size) for img in bgr]
        diff = np.concatenate([np.abs(batch[i].cpu().numpy().astype(int) - ref[i][0].astype(int)).ravel()
                               for i in range(len(bgr))])
        mean, p99, worst = float(diff.mean()), float(np.percentile(diff, 99)), int(diff.max())
        same_infos = infos == [r[1] for r in ref]
        # Decoders differ by a level or two (IDCT, chroma upsampling at colour edges: the max can be larger).
        ok = mean <= 1.0 and p99 <= 3 and same_infos
        out.append(Check(f"nvJPEG + GPU letterbox vs cv2, {size}", "PASS" if ok else "FAIL",
                         f"mean {mean:.2f}, p99 {p99:.0f}, max {worst} levels; infos "
                         f"{'equal' if same_infos else 'DIFFER'}", "mean <= 1, p99 <= 3, infos equal"))
    return out


def prepared_batches(tmp: str, img_size: int, batch: int, n: int):
    """`n` training batches from the real stage-1 loader over a generated shapes set, made on the CPU."""
    from model.data.shapes import make_shapes_dataset
    from model.train.engine import TrainConfig, Trainer

    data = os.path.join(tmp, f"shapes{img_size}")
    if not os.path.isdir(data):
        make_shapes_dataset(data, batch * n, 0, seed=0, img_size=img_size)
    cfg = TrainConfig(data=data, out=os.path.join(tmp, "prep"), epochs=1, batch_size=batch, img_size=img_size,
                      stage2_epochs=0, workers=0, device="cpu", progress=False, warmup_iters=10)
    trainer = Trainer(cfg)
    batches = []
    for b in trainer._loader_for(0):
        batches.append(b)
        if len(batches) == n:
            break
    return data, batches


def trainer_on(device: str, data: str, tmp: str, img_size: int, batch: int, amp: bool):
    from model.train.engine import TrainConfig, Trainer
    from model.train.schedule import LrSchedule

    cfg = TrainConfig(data=data, out=os.path.join(tmp, f"out-{device}"), epochs=1, batch_size=batch,
                      img_size=img_size, stage2_epochs=0, workers=0, device=device, progress=False, warmup_iters=10,
                      amp=amp)
    trainer = Trainer(cfg)  # seeded: the same initial weights on every device
    trainer.net.train()
    return trainer, LrSchedule.from_config(trainer.optim_cfg, 1, 100)


def check_amp_step(tmp: str) -> Check:
    data, batches = prepared_batches(tmp, 320, 4, 1)
    losses = {}
    for device, amp in (("cpu", False), ("cuda", True)):
        trainer, schedule = trainer_on(device, data, tmp, 320, 4, amp)
        assert trainer.use_amp == amp
        losses[device] = trainer.train_step(*batches[0], schedule)["loss"]
    rel = abs(losses["cuda"] - losses["cpu"]) / abs(losses["cpu"])
    # 5%: fp16 activations may flip a few of the assigner's near-tied choices on untrained weights; a broken
    # AMP path (wrong scaling, NaNs, a layer left in the wrong dtype) is far off or not finite.
    return Check("AMP training step CUDA vs fp32 CPU (loss)", "PASS" if rel <= 5e-2 else "FAIL",
                 f"{losses['cuda']:.5f} vs {losses['cpu']:.5f} ({rel:.1e})", "<= 5%")


def check_ddp(tmp: str, deadline: Deadline) -> Check:
    if torch.cuda.device_count() < 2:
        return Check("NCCL DDP, 2 processes", "SKIP", f"{torch.cuda.device_count()} GPU: DDP needs >= 2")
    data, _ = prepared_batches(tmp, 160, 2, 4)
    out = os.path.join(tmp, "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "service.cli", "train", "--data", data, "--epochs", "1", "--batch-size", "2", "--img-size", "160",
           "--stage2-epochs", "0", "--out", out, "--workers", "0", "--warmup-iters", "2", "--log-interval", "1",
           "--val-interval", "100", "--no-progress", "--device", "cuda"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, min(240.0, deadline.left())),
                         env=child_env())
    ok = res.returncode == 0 and Path(out, "train_log.csv").is_file()
    tail = (res.stdout + res.stderr).strip().splitlines()[-1:] if not ok else []
    return Check("NCCL DDP, 2 processes, 2 iterations", "PASS" if ok else "FAIL",
                 "rank 0 logged" if ok else f"rc {res.returncode}: {tail}")


def child_env() -> dict[str, str]:
    """The environment for a child process: the repository first on the path, then whatever the caller's path held
    (on the lent GPU machine, the carried wheels: tools/device_gpu_check.sh)."""
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def cuda_timed(fn, seconds: float, min_runs: int = 5) -> float:
    """Median seconds per call, CUDA synchronised around each, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_inference(sizes: list[str], batches: list[int], jpegs: list[bytes], bgr: list[np.ndarray],
                   seconds: float, deadline: Deadline) -> list[dict]:
    from model import Detector, TestConfig

    rows = []
    for size in sizes:
        model = seeded_model(size)
        cfg = TestConfig.serving()
        dets = {"eager fp32": Detector(model, device="cuda", accelerate="eager", test_cfg=cfg),
                "eager fp16": Detector(model, device="cuda", fp16=True, accelerate="eager", test_cfg=cfg),
                "graph fp16": Detector(model, device="cuda", fp16=True, test_cfg=cfg)}
        dets["graph fp16"].warmup(sorted(set(batches)))
        for b in batches:
            if deadline.left() < 60:
                log(skipped=f"timing {size} batch {b}: deadline")
                continue
            x, _ = dets["eager fp32"].preprocess([bgr[i % len(bgr)] for i in range(b)])
            x = x.cuda()
            row = {"size": size, "batch": b}
            for name, det in dets.items():
                row[f"{name} ms"] = cuda_timed(partial(det.forward, x), seconds) * 1e3
            data = [jpegs[i % len(jpegs)] for i in range(b)]
            det = dets["graph fp16"]

            def from_jpeg(det=det, data=data):
                batch, infos = det.preprocess_jpegs(data)
                return det.postprocess(*det.forward(batch), infos)

            row["detector from JPEG img/s"] = b / cuda_timed(from_jpeg, seconds)
            rows.append(row)
            log(**row)
        del dets
        torch.cuda.empty_cache()
    return rows


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_amp_training(tmp: str, steps: int = 20, device: str = "cuda", img_size: int = 640, batch: int = 16) -> dict:
    data, batches = prepared_batches(tmp, img_size, batch, 3)
    trainer, schedule = trainer_on(device, data, tmp, img_size, batch, amp=True)
    losses = []
    for i in range(steps + 2):  # 2 untimed: cuDNN picks its kernels
        if i == 2:
            synchronize(device)
            t0 = time.perf_counter()
        losses.append(trainer.train_step(*batches[i % len(batches)], schedule)["loss"])
    synchronize(device)
    dt = time.perf_counter() - t0
    return {"steps": steps, "img_s": batch * steps / dt, "ms_per_step": 1e3 * dt / steps, "amp": trainer.use_amp,
            "finite": all(np.isfinite(losses)), "first_loss": losses[0], "last_loss": losses[-1],
            "grad_scale": float(trainer.scaler.get_scale())}


def serve_requests(jpegs: list[bytes], n: int, deadline: Deadline, device: str = "cuda") -> tuple[Check, dict]:
    import httpx
    from bench_service import free_port, stop_server

    http_port, grpc_port = free_port(), free_port()
    env = child_env()
    with tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False) as logf:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--device", device, "--http-port",
                                 str(http_port), "--grpc-port", str(grpc_port)], cwd=ROOT, env=env, stdout=logf,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        ready_by = time.monotonic() + max(30.0, min(180.0, deadline.left() - 30))
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {Path(logf.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > ready_by:
                raise RuntimeError(f"server not ready in time: {Path(logf.name).read_text()[-2000:]}")
            time.sleep(0.5)
        model_info = httpx.get(f"{base}/v1/model", timeout=10).json()
        latencies, statuses, lock = [], [], threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                for i in range(k, n, 8):
                    t0 = time.perf_counter()
                    r = c.post("/detect", content=jpegs[i % len(jpegs)], headers={"Content-Type": "image/jpeg"})
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        statuses.append((r.status_code, "detections" in r.json() if r.status_code == 200 else False))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(10.0, deadline.left()))
        wall = time.perf_counter() - t0
        ok = sum(1 for s, has in statuses if s == 200 and has)
        lat = sorted(latencies)
        stats = {"requests": n, "ok": ok, "req_s": len(lat) / wall, "device": model_info.get("device"),
                 "p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
                 "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}
        on_device = str(model_info.get("device", "")).startswith(device)
        status = "PASS" if ok == n and on_device else "FAIL"
        return Check(f"rtmdet serve --device {device}, {n} HTTP requests", status,
                     f"{ok}/{n} answered with detections on {model_info.get('device')}", f"{n}/{n}, {device}"), stats
    finally:
        stop_server(proc)
        os.unlink(logf.name)


def run_section(checks: list[Check], name: str, deadline: Deadline, needs_s: float, fn):
    """Run `fn` if there is time; a failure is a FAIL row (with its message), never a hang or a crash."""
    if deadline.left() < needs_s:
        checks.append(Check(name, "SKIP", f"deadline: {deadline.left():.0f} s left, needs ~{needs_s:.0f} s"))
        return None
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception as exc:  # report and go on: the table must still come out
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        checks.append(Check(name, "FAIL", f"{type(exc).__name__}: {first_line}"))
        return None
    log(section=name, seconds=time.monotonic() - t0)
    return result


def print_tables(checks: list[Check], rows: list[dict], train: dict | None, serve: dict | None) -> None:
    print("\n| check | result | figure | bound |\n|---|---|---|---|")
    for c in checks:
        print(f"| {c.name} | {c.status} | {c.figure} | {c.bound} |")
    if rows:
        keys = [k for k in rows[0] if k not in ("size", "batch")]
        print("\n| size | batch | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2))
        for r in rows:
            print(f"| {r['size']} | {r['batch']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
        print("| seed's figure (TensorRT FP16, RTX 3090) | 1 | | | 0.98 | |")
    if train:
        print(f"\nAMP training, tiny 640, batch 16: {train['img_s']:.1f} img/s ({train['ms_per_step']:.1f} ms/step, "
              f"{train['steps']} steps, losses finite: {train['finite']}, grad scale {train['grad_scale']:g})")
    if serve:
        print(f"rtmdet serve --device cuda: {serve['ok']}/{serve['requests']} ok, {serve['req_s']:.1f} req/s at "
              f"concurrency 8, p50 {serve['p50_ms']:.1f} ms, p99 {serve['p99_ms']:.1f} ms")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {torch.cuda.get_device_name()} "
          f"x{torch.cuda.device_count()}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}; seed's figure: {SEED_FIGURE}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=450.0, help="deadline for the whole run (8 min = 480 s)")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "s"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=1.0, help="per timed measurement")
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); nothing checked",
              file=sys.stderr)
        return 2
    import cv2

    deadline = Deadline(args.budget_s)
    jpegs = [(ROOT / "examples" / f).read_bytes() for f in PHOTO_FILES]
    bgr = [cv2.imread(str(ROOT / "examples" / f)) for f in PHOTO_FILES]
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="rtmdet-gpu-check-") as tmp:
        checks += run_section(checks, "network paths", deadline, 60, partial(check_network_paths, bgr)) or []
        checks += run_section(checks, "device preprocess", deadline, 20,
                              partial(check_device_preprocess, jpegs, bgr)) or []
        amp = run_section(checks, "AMP training step", deadline, 40, partial(check_amp_step, tmp))
        if amp:
            checks.append(amp)
        ddp = run_section(checks, "NCCL DDP", deadline, 60, partial(check_ddp, tmp, deadline))
        if ddp:
            checks.append(ddp)
        rows = run_section(checks, "timing", deadline, 90, partial(time_inference, args.sizes, args.batches, jpegs,
                                                                   bgr, args.seconds, deadline)) or []
        train = run_section(checks, "20 AMP training steps", deadline, 45, partial(time_amp_training, tmp))
        if train:
            checks.append(Check("20 AMP training steps", "PASS" if train["finite"] else "FAIL",
                                f"{train['img_s']:.1f} img/s, loss {train['first_loss']:.3f} -> "
                                f"{train['last_loss']:.3f}", "finite losses"))
        served = run_section(checks, "serve", deadline, 60, partial(serve_requests, jpegs, args.requests, deadline))
        serve_stats = None
        if served:
            checks.append(served[0])
            serve_stats = served[1]
    print_tables(checks, rows, train, serve_stats)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
