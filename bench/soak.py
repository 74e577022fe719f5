"""Load generator for `rtmdet serve`: HTTP and gRPC clients in their own processes, at once, each response
checked against the expected detections for its image.

    .venv/bin/python bench/soak.py soak --duration-s 600 --http-clients 8 --grpc-clients 8
    .venv/bin/python bench/soak.py overload --duration-s 30 --http-clients 24 --grpc-clients 24

`soak` starts a server (loopback, 1 torch thread) and runs closed-loop clients for the duration: every
response is compared with what the bare `Detector` finds on the same decoded image; refusals must be
explicit (HTTP 503 / gRPC RESOURCE_EXHAUSTED), anything else counts as an error. The server's resident
memory is sampled from /proc every few seconds, the queue depth from /metrics; latency percentiles are
reported per minute. `overload` runs clients at several times capacity against a small queue, then drops
to one client and measures recovery. Both print a JSON report (and write it with `--out`).

Everything is bounded: clients stop at the deadline or after `--max-requests` each, on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))



# -- what a right answer is -------------------------------------------------------------------------------
def expected_detections(weights: Path, input_size: int, payloads: list[bytes]) -> list[list[dict]]:
    """The bare Detector's answer for each encoded image, decoded the way the server decodes it."""
    from model import Detector, TestConfig
    from service.imaging import decode_image

    det = Detector.from_checkpoint(weights, device="cpu", test_cfg=TestConfig.serving(input_size=input_size))
    return [det([decode_image(p, 1 << 30, 1 << 30)])[0].to_list() for p in payloads]


def test_images() -> list[np.ndarray]:
    """Real photos in a few sizes, so that a response can only match its own request."""
    from skimage import data

    photos = [cv2.imread(str(REPO / "examples" / "astronaut.jpg")), data.chelsea()[..., ::-1], data.coffee()[..., ::-1]]
    return [np.ascontiguousarray(cv2.resize(p, wh)) for p, wh in zip(photos, [(320, 320), (300, 220), (256, 180)])]


# -- the server under test ----------------------------------------------------------------------------------
sys.path.insert(0, str(REPO / "tests" / "service"))
from svc_helpers import ServerProcess, make_test_checkpoint  # noqa: E402  (the service tests' own server helper)

sys.path.insert(0, str(REPO / "bench"))
from soak_clients import ClientJob, run_client  # noqa: E402  (what the spawned client processes import)


class Server(ServerProcess):
    """`rtmdet serve` with one torch thread, plus what the soak samples: RSS, metrics, batch-time bounds."""

    def __init__(self, weights: Path, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(weights, log_path, **{"OMP_NUM_THREADS": "1", **env})

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(httpx.get(f"{self.http}/metrics", timeout=10).text):
            total += sum(s.value for s in fam.samples
                         if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
        return total

    def batch_p99_s(self) -> float:
        """An upper bound on the 99th-percentile model step (inference + post-processing), from the histogram
        buckets: the edge of the first bucket that holds 99 % of the batches, for each stage."""
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for fam in text_string_to_metric_families(httpx.get(f"{self.http}/metrics", timeout=10).text)
                   for s in fam.samples if s.name == "rtmdet_stage_duration_seconds_bucket"]
        total = 0.0
        for stage in ("inference", "postprocess"):
            buckets = sorted((float(s.labels["le"]), s.value) for s in samples if s.labels.get("stage") == stage)
            count = buckets[-1][1] if buckets else 0
            total += next((le for le, c in buckets if c >= 0.99 * count), 0.0)
        return total

    def stop(self) -> int:
        return self.terminate(timeout=120)


def run_clients(server: Server, protocols: list[str], payloads, wants, threshold: float, duration_s: float,
                max_requests: int, backoff_s: float, api_key: str | None = None,
                probe_s: float = 0.0, probe_min_ok: int = 0, probe_max_s: float = 0.0) -> tuple[float, list]:
    """All clients at once; returns (start time, [(protocol, t_end, latency, outcome, server_ms), ...]). With `probe_s`,
    one more HTTP client ("probe") starts the moment the others stop and runs alone for `probe_s`, and on until it
    has `probe_min_ok` answers, `probe_max_s` at the most."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    ready, go = ctx.Value("i", 0), ctx.Value("d", 0.0)
    procs = []
    windows = [(proto, 0.0, duration_s) for proto in protocols]
    if probe_s > 0:
        windows.append(("probe", duration_s, duration_s + probe_s))
    for k, (proto, t0, t1) in enumerate(windows):
        job = ClientJob(proto, server.grpc if proto == "grpc" else server.http, api_key, payloads, wants, threshold,
                        t0, t1, max_requests, backoff_s, offset=k)
        if proto == "probe":
            job = replace(job, min_ok=probe_min_ok, until_s=duration_s + max(probe_s, probe_max_s))
        p = ctx.Process(target=run_client, args=(job, out, ready, go), daemon=True)
        p.start()
        procs.append(p)
    # Start together once every client process has imported (slow on a busy machine), so none misses its window.
    deadline = time.time() + 300
    while ready.value < len(procs):
        if time.time() > deadline or not all(p.is_alive() for p in procs):
            raise RuntimeError(f"only {ready.value} of {len(procs)} client processes got ready")
        time.sleep(0.05)
    start = time.time() + 0.2
    go.value = start
    results = []
    for _ in procs:
        proto, records = out.get(timeout=duration_s + max(probe_s, probe_max_s) + 300)
        results += [(proto, *r) for r in records]
    for p in procs:
        p.join(timeout=30)
    return start, results


# -- reports --------------------------------------------------------------------------------------------------
def pct(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    p = np.percentile(np.array(values) * 1000.0, [50, 95, 99])
    return {"n": len(values), "p50_ms": round(float(p[0]), 1), "p95_ms": round(float(p[1]), 1),
            "p99_ms": round(float(p[2]), 1), "max_ms": round(max(values) * 1000.0, 1)}


def outcome_counts(results) -> dict:
    counts: dict[str, int] = {}
    for proto, _, _, outcome, _ in results:
        key = f"{proto}:{outcome}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class Sampler:
    """Server RSS and queue depth every `period_s`, in a thread."""

    server: Server
    period_s: float = 5.0
    rss: list[tuple[float, float]] = field(default_factory=list)
    depth: list[float] = field(default_factory=list)

    def run(self, until: float) -> None:
        while time.time() < until:
            try:
                self.rss.append((time.time(), self.server.rss_mib()))
                self.depth.append(self.server.metric("rtmdet_queue_depth"))
            except (OSError, httpx.HTTPError):
                pass
            time.sleep(self.period_s)


def start_run(args, mode: str) -> tuple[Server, list[bytes], list[list[dict]], list[str]]:
    """A ready server with the run's batch/queue settings, the encoded test images, the right answer for each,
    and one protocol per client."""
    workdir = Path(tempfile.mkdtemp(prefix=f"rtmdet-{mode}-"))
    weights = Path(args.weights) if args.weights else make_test_checkpoint(workdir / "tiny3.pth")
    env = {"RTMDET_INPUT_SIZE": str(args.input_size), "RTMDET_SCORE_THRESHOLD": str(args.threshold),
           "RTMDET_MAX_BATCH_SIZE": str(args.max_batch_size), "RTMDET_MAX_QUEUE_SIZE": str(args.max_queue_size),
           "RTMDET_MAX_QUEUE_DELAY_MS": "5"}
    server = Server(weights, workdir / "server.log", env)
    try:
        server.wait_ready()
        payloads = [cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for img in test_images()]
        wants = expected_detections(weights, args.input_size, payloads)
    except BaseException:
        server.stop()
        raise
    return server, payloads, wants, ["http"] * args.http_clients + ["grpc"] * args.grpc_clients


def soak(args) -> dict:
    import threading

    server, payloads, wants, protocols = start_run(args, "soak")
    try:
        sampler = Sampler(server)
        rss_start = server.rss_mib()
        thread = threading.Thread(target=sampler.run, args=(time.time() + args.duration_s + 5,), daemon=True)
        thread.start()
        start, results = run_clients(server, protocols, payloads, wants, args.threshold, args.duration_s,
                                     args.max_requests, backoff_s=0.01)
        thread.join()
        rss_end = server.rss_mib()
    finally:
        exit_code = server.stop()
    minutes = []
    for m in range(int(np.ceil(args.duration_s / 60.0))):
        window = [r for r in results if start + 60 * m <= r[1] < start + 60 * (m + 1)]
        server = pct([r[4] / 1000.0 for r in window if r[3] == "ok"])
        minutes.append({"minute": m + 1, **pct([r[2] for r in window if r[3] == "ok"]),
                        "server_p99_ms": server.get("p99_ms"), "refused": sum(r[3] == "refused" for r in window),
                        "rss_mib": next((round(x, 1) for t, x in reversed(sampler.rss) if t < start + 60 * (m + 1)),
                                        None)})
    rss_after_warm = [r for t, r in sampler.rss if t >= start + min(60.0, args.duration_s / 4)]
    ok = [lat for _, _, lat, o, _ in results if o == "ok"]
    report = {
        "mode": "soak", "duration_s": args.duration_s, "http_clients": args.http_clients,
        "grpc_clients": args.grpc_clients, "max_batch_size": args.max_batch_size,
        "max_queue_size": args.max_queue_size, "input_size": args.input_size,
        "requests": len(results), "throughput_rps": round(len(results) / args.duration_s, 2),
        "outcomes": outcome_counts(results), "wrong": sum(r[3] == "wrong" for r in results),
        "errors": sum(r[3] not in ("ok", "refused") for r in results),
        "latency_ok": pct(ok), "server_latency_ok": pct([r[4] / 1000.0 for r in results if r[3] == "ok"]),
        "per_minute": minutes,
        "queue_depth_nonzero_fraction": round(float(np.mean([d > 0 for d in sampler.depth])), 3)
        if sampler.depth else None,
        "rss_mib": {"at_start": round(rss_start, 1), "at_end": round(rss_end, 1),
                    "max": round(max(r for _, r in sampler.rss), 1),
                    "growth_after_first_minute": round(rss_after_warm[-1] - rss_after_warm[0], 1)
                    if len(rss_after_warm) > 1 else None},
        "server_exit_code": exit_code,
    }
    return report


def overload(args) -> dict:
    server, payloads, wants, protocols = start_run(args, "overload")
    try:
        start, everything = run_clients(server, protocols, payloads, wants, args.threshold, args.duration_s,
                                        args.max_requests, backoff_s=args.backoff_s, probe_s=args.recovery_s,
                                        probe_min_ok=args.recovery_min_ok, probe_max_s=args.recovery_max_s)
        results = [r for r in everything if r[0] != "probe"]
        after = [r for r in everything if r[0] == "probe"]
        batches = server.metric("rtmdet_batch_size_count")
        images = server.metric("rtmdet_batch_size_sum")
        batch_p99_s = server.batch_p99_s()
        batch_s = (server.metric("rtmdet_stage_duration_seconds_sum", stage="inference") +
                   server.metric("rtmdet_stage_duration_seconds_sum", stage="postprocess")) / max(batches, 1)
    finally:
        exit_code = server.stop()
    ok = [lat for _, _, lat, o, _ in results if o == "ok"]
    refused = [lat for _, _, lat, o, _ in results if o == "refused"]
    # An accepted request waits for at most the batches ahead of it (a full queue) plus its own and the one
    # running: the bound the queue settings promise, in units of the measured mean batch time.
    batches_ahead = int(np.ceil(args.max_queue_size / args.max_batch_size)) + 2
    report = {
        "mode": "overload", "duration_s": args.duration_s, "clients": len(protocols),
        "max_batch_size": args.max_batch_size, "max_queue_size": args.max_queue_size,
        "input_size": args.input_size, "requests": len(results),
        "outcomes": outcome_counts(results), "wrong": sum(r[3] == "wrong" for r in results),
        "errors": sum(r[3] not in ("ok", "refused") for r in results),
        "accepted_rps": round(len(ok) / args.duration_s, 2), "refused_rps": round(len(refused) / args.duration_s, 2),
        "latency_accepted": pct(ok), "latency_refused": pct(refused),
        # the server's own view (admission to answer): what the queue settings bound
        "server_latency_accepted": pct([r[4] / 1000.0 for r in results if r[3] == "ok"]),
        "batches_run": batches, "images_run": images, "mean_batch_ms": round(batch_s * 1000.0, 1),
        "queue_bound_ms": round(batches_ahead * batch_s * 1000.0, 1),
        "batch_p99_upper_ms": round(batch_p99_s * 1000.0, 1),
        "queue_bound_p99_ms": round(batches_ahead * batch_p99_s * 1000.0, 1),
        "recovery": {"outcomes": outcome_counts(after), "latency": pct([r[2] for r in after if r[3] == "ok"]),
                     "first_request_ms": round(after[0][2] * 1000.0, 1) if after else None,
                     "sequence": [r[3] for r in sorted(after, key=lambda r: r[1])],
                     # from the end of the overload window to the first accepted probe answer
                     "first_ok_after_overload_ms": next((round((t - start - args.duration_s) * 1000.0, 1)
                                                         for _, t, _, o, _ in after if o == "ok"), None)},
        "server_exit_code": exit_code,
    }
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["soak", "overload"])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--http-clients", type=int, default=8)
    p.add_argument("--grpc-clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=1_000_000, help="per client")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--recovery-s", type=float, default=5.0, help="overload: one client alone afterwards, for this long")
    p.add_argument("--recovery-min-ok", type=int, default=0,
                   help="overload: the lone client goes on past --recovery-s until this many answers ...")
    p.add_argument("--recovery-max-s", type=float, default=60.0, help="... for this long at the most")
    p.add_argument("--backoff-s", type=float, default=0.1, help="overload: a client's pause after a 503")
    p.add_argument("--weights", help="default: the service tests' deterministic tiny checkpoint")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = soak(args) if args.mode == "soak" else overload(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["wrong"] == 0 and report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

