"""The soak's clients (bench/soak.py), each run in its own spawned process.

Kept apart from soak.py so that a client process imports only what a client needs (httpx, grpc and
`service.client`, no torch): with a dozen clients on a 2-core machine, each importing torch and the model
package cost about 4 s of CPU apiece before the load could start.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass

import httpx

MARGIN = 0.02  # detections this close to the threshold may flip with batch composition; they are not judged


def same_detections(got: list[dict], want: list[dict], threshold: float) -> bool:
    """Every detection clear of the threshold on either side is matched by label, box (1 px) and score (0.01)."""
    def clear(d):
        return d["score"] >= threshold + MARGIN

    def found(d, pool):
        return any(o["label"] == d["label"] and abs(o["score"] - d["score"]) < 0.01 and
                   max(abs(a - b) for a, b in zip(o["box"], d["box"])) < 1.0 for o in pool)
    return all(found(w, got) for w in want if clear(w)) and all(found(g, want) for g in got if clear(g))


@dataclass
class ClientJob:
    protocol: str  # "http" | "grpc"
    target: str
    api_key: str | None
    payloads: list[bytes]
    wants: list[list[dict]]
    threshold: float
    begin_s: float  # from the common start (set once every client is ready), when this one starts
    end_s: float  # ... and stops
    max_requests: int
    backoff_s: float  # pause after a refusal (a polite client honouring Retry-After would wait longer)
    offset: int = 0
    # Keep going past end_s until this many answers (bounded by until_s from the start): the recovery probe, so
    # that "accepted again" gets enough answers to judge on a slow machine, where one batch may take seconds.
    min_ok: int = 0
    until_s: float = 0.0


def _outcome_http(client: httpx.Client, job: ClientJob, i: int) -> tuple[str, float]:
    """(outcome, the server's own total_ms for an answered request, else nan)."""
    try:
        r = client.post("/detect", content=job.payloads[i], headers={"Content-Type": "image/jpeg"})
    except httpx.HTTPError as exc:
        return f"http_exception:{type(exc).__name__}", float("nan")
    if r.status_code == 200:
        body = r.json()
        right = same_detections(body["detections"], job.wants[i], job.threshold)
        return ("ok" if right else "wrong"), body["timing"]["total_ms"]
    return ("refused" if r.status_code == 503 else f"http_{r.status_code}"), float("nan")


def _outcome_grpc(client, job: ClientJob, i: int) -> tuple[str, float]:
    import grpc

    from service.client import response_to_dict
    try:
        resp = client.detect_pb(job.payloads[i], timeout=120)
    except grpc.RpcError as exc:
        refused = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return ("refused" if refused else f"grpc_{exc.code().name}"), float("nan")
    right = same_detections(response_to_dict(resp)["detections"], job.wants[i], job.threshold)
    return ("ok" if right else "wrong"), resp.timing.total_ms


def run_client(job: ClientJob, out: mp.Queue, ready, go) -> None:
    """Closed loop: the next request when the last one is answered.
    Records (t_end, latency_s, outcome, server_ms). `ready` counts clients done importing and connecting;
    `go` holds the common start time (0 until the parent sets it)."""
    records: list[tuple[float, float, str, float]] = []
    if job.protocol in ("http", "probe"):
        headers = {"Authorization": f"Bearer {job.api_key}"} if job.api_key else {}
        client = httpx.Client(base_url=job.target, headers=headers, timeout=120)
        call = _outcome_http
    else:
        from service.client import NO_RETRY, GrpcDetectorClient
        # No retries: a refusal is what this load generator counts.
        client = GrpcDetectorClient(job.target, api_key=job.api_key, timeout=120, retry=NO_RETRY)
        call = _outcome_grpc
    try:
        with ready.get_lock():
            ready.value += 1
        while go.value == 0.0:
            time.sleep(0.01)
        time.sleep(max(go.value + job.begin_s - time.time(), 0.0))
        stop_at = go.value + job.end_s
        n = 0
        hard_stop = go.value + max(job.end_s, job.until_s)
        oks = 0
        while n < job.max_requests and (time.time() < stop_at or (oks < job.min_ok and time.time() < hard_stop)):
            i = (job.offset + n) % len(job.payloads)
            t0 = time.time()
            outcome, server_ms = call(client, job, i)
            t1 = time.time()
            records.append((t1, t1 - t0, outcome, server_ms))
            n += 1
            oks += outcome == "ok"
            if outcome == "refused":
                time.sleep(job.backoff_s)
    finally:
        client.close()
    out.put((job.protocol, records))
