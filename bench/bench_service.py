"""Service throughput and latency (HTTP and gRPC at several concurrencies) against the bare Detector,
measured in the same run on the same machine.

    .venv/bin/python bench/bench_service.py [--duration 10] [--threads 1] [--input-size 640] [--concurrency 1 8 32]
        [--accelerate openvino] [--rounds 3]

The Detector baseline: batch-1 latency (p50 over repeated single images) and batch-B throughput
(B = the server's max batch size), on already decoded images. The service numbers include
everything a client sees: upload, decode, letterbox, queueing, inference, NMS, JSON/protobuf.
Targets (tiny at 640, CPU): throughput at concurrency 32 >= 0.95x the batched Detector; p50 at
concurrency 1 no more than 10 ms above the Detector's batch-1 latency.

With `--rounds N` every (protocol, concurrency) cell is measured N times, each time right after its own
baseline, the cells taking turns; the table gives each cell's median (throughput and ratio) over the rounds.
The CPU columns say where the cores went, as a share of all the machine's cores: the bare Detector's process
while it ran its batches, and during each window the server process and this process (the load generator: its
async clients, upload and reading the answers). The
bare Detector pays for neither the server's request path nor a load generator on the same cores.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import Detector, TestConfig, build_rtmdet, save_checkpoint  # noqa: E402
from model.checkpoint import make_meta  # noqa: E402
from model.inference.allocator import keep_freed_memory  # noqa: E402
from service.settings import DEFAULT_WEIGHTS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lively_random_model(size: str):
    """Random weights that still produce boxes (a default-initialised network's features vanish, leaving
    every box empty, which would make post-processing unrealistically cheap)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = build_rtmdet(size, num_classes=80)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    for conv in m.bbox_head.rtm_cls:
        nn.init.normal_(conv.weight, std=5.0)
        nn.init.constant_(conv.bias, -1.5)
    for conv in m.bbox_head.rtm_reg:
        nn.init.normal_(conv.weight, std=0.3)
        nn.init.constant_(conv.bias, 1.5)
    return m


def weights_or_random(weights: Path, size: str, tmp: Path) -> Path:
    """`weights`, or when that file is missing a lively random checkpoint of `size` saved under `tmp`."""
    if weights.is_file():
        return weights
    path = tmp / f"random_{size}.pth"
    save_checkpoint(path, lively_random_model(size).state_dict(), make_meta())
    print(f"{weights} not found: timing a randomly initialised {size} model instead")
    return path


def percentiles(lat_s: list[float]) -> tuple[float, float, float]:
    p = np.percentile(np.array(lat_s) * 1000.0, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


class DetectorBaseline:
    """The bare Detector on decoded images, re-measured next to every service measurement: on a shared,
    noisy machine only numbers taken close together in time compare fairly."""

    def __init__(self, weights: Path, size: str, input_size: int, image: np.ndarray, batch: int,
                 accelerate: str | None = None, sparse_regression: bool = False) -> None:
        self.det = Detector.from_checkpoint(weights, size=size, device="cpu", accelerate=accelerate,
                                            test_cfg=TestConfig.serving(input_size=input_size),
                                            sparse_regression=sparse_regression)
        self.image, self.batch = image, batch
        self.cpu_share = 0.0
        self.det.warmup([1, batch])

    def batch1_p50_ms(self, duration: float) -> float:
        lat, end = [], time.perf_counter() + duration
        while time.perf_counter() < end or len(lat) < 5:
            t0 = time.perf_counter()
            self.det([self.image])
            lat.append(time.perf_counter() - t0)
        return percentiles(lat)[0]

    def batched_ips(self, duration: float) -> float:
        """Images/s at the full batch; `cpu_share` is left at the CPU seconds per second it used."""
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < duration or n < 2 * self.batch:
            self.det([self.image] * self.batch)
            n += self.batch
        wall = time.perf_counter() - t0
        self.cpu_share = (time.process_time() - c0) / wall
        return n / wall


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """The CPU seconds the server and this process spend between `start()` and `stop()`."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.server_s = self.client_s = 0.0
        self._t0: tuple[float, float] | None = None

    def start(self) -> None:
        self._t0 = (process_cpu_s(self.server_pid), time.process_time())

    def stop(self) -> None:
        if self._t0 is not None:
            self.server_s = process_cpu_s(self.server_pid) - self._t0[0]
            self.client_s = time.process_time() - self._t0[1]


async def closed_loop(call, concurrency: int, warmup: float, duration: float,
                      cpu: CpuWindow | None = None) -> tuple[float, list[float], int]:
    """`concurrency` clients, each sending its next request when the last one returns. Only requests that
    finish inside the measuring window (after `warmup`, so the queue is at steady state) count:
    throughput = those / duration, which neither counts the warm-up nor the drain at the end."""
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    lat: list[float] = []
    errors = 0

    async def clock():
        if cpu is not None:
            await asyncio.sleep(warmup)
            cpu.start()
            await asyncio.sleep(duration)
            cpu.stop()

    async def client():
        nonlocal errors
        while time.perf_counter() < window[1]:
            t0 = time.perf_counter()
            ok = await call()
            t1 = time.perf_counter()
            if window[0] <= t1 <= window[1]:
                if ok:
                    lat.append(t1 - t0)
                else:
                    errors += 1
    await asyncio.gather(clock(), *(client() for _ in range(concurrency)))
    return len(lat) / duration, lat, errors


async def load_http(url: str, data: bytes, concurrency: int, warmup: float, duration: float,
                    cpu: CpuWindow | None = None):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def call() -> bool:
            r = await client.post(url, content=data, headers={"Content-Type": "image/jpeg"})
            return r.status_code == 200
        return await closed_loop(call, concurrency, warmup, duration, cpu)


async def load_grpc(target: str, data: bytes, concurrency: int, warmup: float, duration: float,
                    cpu: CpuWindow | None = None):
    import grpc

    from service.proto_gen.rtmdet.v1 import detector_pb2, detector_pb2_grpc
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = detector_pb2_grpc.DetectorStub(ch)
        req = detector_pb2.DetectRequest(encoded=data)

        async def call() -> bool:
            try:
                await stub.Detect(req, timeout=300)
                return True
            except grpc.RpcError:
                return False
        return await closed_loop(call, concurrency, warmup, duration, cpu)


def wait_for(url: str, proc: subprocess.Popen, end: float, period: float = 0.02) -> float:
    """Polls `url` every `period` s until it answers 200 (the monotonic time it first did), or `proc` exits, or
    the monotonic clock passes `end` (both SystemExit)."""
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(period)
    raise SystemExit(f"{url} did not answer in time")


def start_server(weights: Path, args, tree: Path = REPO,
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """`rtmdet serve` of the code in `tree` (another checkout: bench_revisions.py), ready, with `extra_env` on top
    of the benchmark's settings; (process, HTTP base URL, gRPC target)."""
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "RTMDET_INPUT_SIZE": str(args.input_size), "RTMDET_MAX_BATCH_SIZE": str(args.batch),
           "RTMDET_DEVICE": "cpu", "RTMDET_MAX_QUEUE_SIZE": "256", "PYTHONPATH": str(tree)}
    env.pop("RTMDET_API_KEY", None)
    if args.accelerate:
        env["RTMDET_ACCELERATE"] = args.accelerate
    if getattr(args, "sparse_regression", None) is not None:  # else the server's default
        env["RTMDET_SPARSE_REGRESSION"] = str(args.sparse_regression).lower()
    env.update(extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--weights", str(weights), "--size", args.size,
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port)], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(f"{base}/readyz", proc, time.monotonic() + 300, period=0.3)
    except SystemExit:
        proc.kill()
        raise
    return proc, base, f"127.0.0.1:{grpc_port}"


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), killed if it has not exited within a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                    help="checkpoint (default: the shipped one; a random tiny one if it is missing)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--input-size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=8, help="the server's max batch size and the Detector's batch")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement window")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for the Detector and the server (OMP_NUM_THREADS); 0: default. "
                         "On a CPU shared with other jobs, 1 avoids OpenMP barrier stalls that swamp the numbers")
    ap.add_argument("--accelerate", default=None,
                    help="the runner, for the Detector and the server alike (default: the CPU's default, eager)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every cell this many times, each after its own baseline; report the medians")
    ap.add_argument("--sparse-regression", choices=("true", "false"), default="true",
                    help="the box branch at the candidates only, for the Detector and the server alike (the "
                         "service's default: true)")
    ap.add_argument("--image", type=Path, default=REPO / "examples" / "astronaut.jpg")
    args = ap.parse_args()
    args.sparse_regression = args.sparse_regression == "true"
    keep_freed_memory()  # the bare Detector runs as `rtmdet serve` does (model.inference.allocator)

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server subprocess
    tmp = tempfile.TemporaryDirectory()
    weights = weights_or_random(args.weights, args.size, Path(tmp.name))
    data = args.image.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    print(f"image {args.image.name} {image.shape[1]}x{image.shape[0]}, {args.size} at {args.input_size}, "
          f"batch {args.batch}, {os.cpu_count()} CPUs, torch threads {args.threads or 'default'}, "
          f"runner {args.accelerate or 'default'}, sparse regression {args.sparse_regression}, "
          f"{args.duration:.0f} s per measurement")

    baseline = DetectorBaseline(weights, args.size, args.input_size, image, args.batch, args.accelerate,
                                args.sparse_regression)
    base_batch_s = args.batch / baseline.batched_ips(2.0)  # seconds per full batch, to size the warm-ups
    proc, http_base, grpc_target = start_server(weights, args)
    cells = [(proto, conc) for proto in ("http", "grpc") for conc in args.concurrency]
    runs: dict[tuple[str, int], list[dict]] = {cell: [] for cell in cells}
    try:
        for _ in range(args.rounds):
            for proto, conc in cells:
                runs[proto, conc].append(measure_cell(proto, conc, args, baseline, base_batch_s, data, proc,
                                                      http_base, grpc_target))
    finally:
        stop_server(proc)

    cores = os.cpu_count() or 1
    print()
    print(f"medians over {args.rounds} round(s); CPU: share of all {cores} cores during the window")
    print("| protocol | concurrency | img/s | p50 ms | p95 ms | p99 ms | errors | Detector (measured just before) "
          "| service vs Detector | Detector CPU | server CPU | load generator CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (proto, conc), got in runs.items():
        med = {k: statistics.median(r[k] for r in got) for k in ("ips", "p50", "p95", "p99", "base", "base_cpu",
                                                                  "server", "client")}
        errors = sum(r["errors"] for r in got)
        if conc == 1:
            ref, vs = f"batch-1 p50 {med['base']:.1f} ms", f"p50 {med['p50'] - med['base']:+.1f} ms"
        else:
            ratios = sorted(r["ips"] / r["base"] for r in got)
            spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            ref = f"batch-{args.batch} {med['base']:.2f} img/s"
            vs = f"{statistics.median(ratios):.2f}x throughput{spread}"
        print(f"| {proto} | {conc} | {med['ips']:.2f} | {med['p50']:.1f} | {med['p95']:.1f} | {med['p99']:.1f} | "
              f"{errors} | {ref} | {vs} | {med['base_cpu'] / cores:.0%} | {med['server'] / cores:.0%} | "
              f"{med['client'] / cores:.0%} |")
    return 0


def measure_cell(proto: str, conc: int, args, baseline: DetectorBaseline, base_batch_s: float, data: bytes,
                 proc: subprocess.Popen, http_base: str, grpc_target: str) -> dict:
    """One (protocol, concurrency) window right after its own baseline."""
    base = baseline.batch1_p50_ms(args.duration / 2) if conc == 1 else baseline.batched_ips(args.duration / 2)
    # Warm-up long enough for every client to have gone round once at this concurrency.
    warmup = max(1.0, 1.5 * conc / args.batch * base_batch_s)
    cpu = CpuWindow(proc.pid)
    if proto == "http":
        ips, lat, errors = asyncio.run(load_http(f"{http_base}/detect", data, conc, warmup, args.duration, cpu))
    else:
        ips, lat, errors = asyncio.run(load_grpc(grpc_target, data, conc, warmup, args.duration, cpu))
    p50, p95, p99 = percentiles(lat) if lat else (float("nan"),) * 3
    return {"ips": ips, "p50": p50, "p95": p95, "p99": p99, "errors": errors, "base": base,
            "base_cpu": baseline.cpu_share if conc > 1 else float("nan"),
            "server": cpu.server_s / args.duration, "client": cpu.client_s / args.duration}


if __name__ == "__main__":
    sys.exit(main())
