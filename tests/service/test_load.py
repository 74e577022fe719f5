"""Under concurrency: batches form, both protocols at once, queue full, deadlines, SIGTERM drain."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from svc_helpers import API_KEY, INPUT_SIZE, ServerProcess, jpeg, metric_samples, metric_value

from model import Detector, TestConfig
from service.client import NO_RETRY, GrpcDetectorClient

AUTH = {"Authorization": f"Bearer {API_KEY}"}


samples, value = metric_samples, metric_value


def http_detect(base: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{base}/detect", content=data, headers={"Content-Type": "image/jpeg", **AUTH},
                      params=params, timeout=120)


def matches(got: list[dict], want, margin: float = 0.01) -> bool:
    """Every confidently kept detection (score clear of the threshold) is in `got` (batching can move
    floats a little, so borderline boxes may flip)."""
    for box, score, label in zip(want.boxes, want.scores, want.labels):
        if score < 0.3 + margin:
            continue
        if not any(g["label"] == label and np.abs(np.array(g["box"]) - box).max() < 0.5 for g in got):
            return False
    return True


@pytest.fixture(scope="module")
def images(photos):
    """Three photos of different sizes, so a response can only match its own request."""
    import cv2
    return [photos["coffee"], cv2.resize(photos["chelsea"], (256, 200)), cv2.resize(photos["astronaut"], (200, 240))]


def test_both_protocols_hammered_at_once_form_batches(server, checkpoint, images):
    det = Detector.from_checkpoint(checkpoint, device="cpu",
                                   test_cfg=TestConfig.serving(input_size=INPUT_SIZE, max_per_img=100))
    wants = det(images)
    payloads = [jpeg(img, 100) for img in images]
    decoded_wants = [det([__import__("cv2").imdecode(np.frombuffer(p, np.uint8), 1)])[0] for p in payloads]
    before = samples(server.http)
    n = 24
    with GrpcDetectorClient(server.grpc, api_key=API_KEY, timeout=120) as gc, ThreadPoolExecutor(16) as pool:
        http_futs = [pool.submit(http_detect, server.http, payloads[i % 3]) for i in range(n)]
        grpc_futs = [pool.submit(gc.detect, images[i % 3]) for i in range(n)]
        http_res = [f.result() for f in http_futs]
        grpc_res = [f.result() for f in grpc_futs]
    for i, r in enumerate(http_res):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == (images[i % 3].shape[1], images[i % 3].shape[0])
        assert matches(body["detections"], decoded_wants[i % 3])
    for i, body in enumerate(grpc_res):
        assert (body["width"], body["height"]) == (images[i % 3].shape[1], images[i % 3].shape[0])
        assert matches(body["detections"], wants[i % 3])
    after = samples(server.http)
    batches = value(after, "rtmdet_batch_size_count") - value(before, "rtmdet_batch_size_count")
    images_run = value(after, "rtmdet_batch_size_sum") - value(before, "rtmdet_batch_size_sum")
    singles = value(after, "rtmdet_batch_size_bucket", le="1.0") - value(before, "rtmdet_batch_size_bucket", le="1.0")
    assert images_run == 2 * n
    assert batches < 2 * n and singles < batches, (batches, singles)  # real batches formed
    assert max(b["timing"]["batch_size"] for b in grpc_res) > 1
    for proto, endpoint, ok in (("http", "/detect", "200"), ("grpc", "Detect", "OK")):
        done = value(after, "rtmdet_requests_total", protocol=proto, endpoint=endpoint, status=ok) - \
            value(before, "rtmdet_requests_total", protocol=proto, endpoint=endpoint, status=ok)
        assert done == n, proto


@pytest.fixture(scope="module")
def tight_server(checkpoint, tmp_path_factory):
    """Slow (640 px input) with batches of 2 and room for 6 waiting requests."""
    srv = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "tight.log", RTMDET_API_KEY=API_KEY,
                        RTMDET_INPUT_SIZE="640", RTMDET_MAX_BATCH_SIZE="2", RTMDET_MAX_QUEUE_SIZE="6",
                        RTMDET_MAX_QUEUE_DELAY_MS="2")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_queue_full_is_refused_at_once(tight_server, photos):
    data = jpeg(photos["coffee"])
    before = samples(tight_server.http)
    # No client retries: the refusals themselves are counted.
    with GrpcDetectorClient(tight_server.grpc, api_key=API_KEY, timeout=120, retry=NO_RETRY) as gc, \
            ThreadPoolExecutor(24) as pool:
        http_futs = [pool.submit(http_detect, tight_server.http, data) for _ in range(16)]

        def grpc_call():
            try:
                gc.detect(data)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name
        grpc_futs = [pool.submit(grpc_call) for _ in range(8)]
        http_codes = [f.result().status_code for f in http_futs]
        grpc_codes = [f.result() for f in grpc_futs]
    refused = http_codes.count(503) + grpc_codes.count("RESOURCE_EXHAUSTED")
    assert set(http_codes) <= {200, 503} and set(grpc_codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert refused >= 24 - 6 - 2 - 4  # at most 6 waiting + 2 running, give or take requests finishing meanwhile
    assert http_codes.count(200) + grpc_codes.count("OK") >= 6
    after = samples(tight_server.http)
    assert value(after, "rtmdet_batcher_rejected_total") - value(before, "rtmdet_batcher_rejected_total") == refused
    assert value(after, "rtmdet_requests_total", protocol="http", endpoint="/detect", status="503") - \
        value(before, "rtmdet_requests_total", protocol="http", endpoint="/detect", status="503") == \
        http_codes.count(503)


def test_expired_requests_are_dropped_before_inference(tight_server, photos):
    data = jpeg(photos["coffee"])
    before = samples(tight_server.http)
    with GrpcDetectorClient(tight_server.grpc, api_key=API_KEY, timeout=120) as gc, ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(http_detect, tight_server.http, data) for _ in range(4)]  # keeps the worker busy
        # Send the late ones only once a batch of the busy ones is running (its jobs' queue wait is recorded as
        # inference starts): anything sent later waits for that batch and expires. A fixed 50 ms sleep let a slow
        # decode put a late request into the first batch (it then ran and was counted).
        started = value(before, "rtmdet_stage_duration_seconds_count", stage="queue_wait")
        end = time.monotonic() + 30
        while time.monotonic() < end:
            snap = samples(tight_server.http)
            if value(snap, "rtmdet_requests_in_flight", protocol="http") >= 4 and \
                    value(snap, "rtmdet_stage_duration_seconds_count", stage="queue_wait") > started:
                break
            time.sleep(0.005)
        else:
            pytest.fail("the busy requests never reached a running batch")
        late_http = pool.submit(http_detect, tight_server.http, data, timeout_ms=30)

        def late_grpc():
            try:
                gc.detect(data, timeout=0.03)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name
        late_g = pool.submit(late_grpc)
        assert late_http.result().status_code == 504
        assert "deadline" in late_http.result().json()["detail"]
        assert late_g.result() == "DEADLINE_EXCEEDED"
        assert all(f.result().status_code == 200 for f in busy)
    time.sleep(0.5)  # let the worker reach (and drop) the expired requests
    after = samples(tight_server.http)
    assert value(after, "rtmdet_batch_size_sum") - value(before, "rtmdet_batch_size_sum") == 4  # only the busy ones
    dropped = sum(value(after, "rtmdet_batcher_dropped_total", reason=r) -
                  value(before, "rtmdet_batcher_dropped_total", reason=r) for r in ("expired", "cancelled"))
    # The HTTP one always reaches the service; the gRPC one may expire before its handler even starts.
    assert dropped >= 1


def test_sigterm_under_load_answers_every_accepted_request(tight_server, photos):
    data = jpeg(photos["coffee"])
    with GrpcDetectorClient(tight_server.grpc, api_key=API_KEY, timeout=120) as gc, ThreadPoolExecutor(8) as pool:
        http_futs = [pool.submit(http_detect, tight_server.http, data) for _ in range(4)]
        grpc_futs = [pool.submit(gc.detect, data) for _ in range(2)]
        end = time.monotonic() + 30
        while time.monotonic() < end:  # wait until all six are inside the server
            snap = samples(tight_server.http)
            if sum(value(snap, "rtmdet_requests_in_flight", protocol=p) for p in ("http", "grpc")) >= 6:
                break
            time.sleep(0.01)
        else:
            pytest.fail("requests never got in flight")
        tight_server.proc.send_signal(__import__("signal").SIGTERM)
        assert [f.result().status_code for f in http_futs] == [200] * 4
        assert all(f.result()["width"] == 300 for f in grpc_futs)
    # Wait for the drain to finish: a second SIGTERM here would test something else.
    assert tight_server.wait_exit(timeout=120) == 0
    assert "rtmdet serve: stopped" in tight_server.log_path.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tight_server.http}/healthz", timeout=2)
