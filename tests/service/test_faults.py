"""Faults in the model step, injected through RTMDET_FAULT_INJECTION (service/faults.py) into a real server:
out-of-memory (split-in-halves retry), a raising model step, a hung one (watchdog), and readiness meanwhile."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svc_helpers import API_KEY, INPUT_SIZE, ServerProcess, jpeg
from test_load import matches, samples, value

from model import Detector, TestConfig

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The watchdog must stay clear of a normal (split) batch on a busy 2-core machine, and the hang well past it.
HANG_S = 7.0
WATCHDOG_S = 3.0


@pytest.fixture(scope="module")
def triggers(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return {"raise": d / "raise", "hang": d / "hang"}


@pytest.fixture(scope="module")
def fault_server(checkpoint, tmp_path_factory, triggers):
    faults = {"oom_above_batch": 2, "raise_trigger": str(triggers["raise"]), "hang_trigger": str(triggers["hang"]),
              "hang_s": HANG_S}
    srv = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "faults.log", RTMDET_API_KEY=API_KEY,
                        RTMDET_FAULT_INJECTION=json.dumps(faults), RTMDET_INFERENCE_TIMEOUT_S=str(WATCHDOG_S),
                        RTMDET_MAX_BATCH_SIZE="8", RTMDET_MAX_QUEUE_DELAY_MS="100", OMP_NUM_THREADS="1")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def post(base: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{base}/detect", content=data, headers={"Content-Type": "image/jpeg", **AUTH}, timeout=60)


def test_out_of_memory_splits_the_batch_before_failing_anyone(fault_server, checkpoint, photos):
    img = photos["coffee"]
    data = jpeg(img, 100)
    det = Detector.from_checkpoint(checkpoint, device="cpu",
                                   test_cfg=TestConfig.serving(input_size=INPUT_SIZE, max_per_img=100))
    want = det([cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)])[0]
    before = samples(fault_server.http)
    with ThreadPoolExecutor(8) as pool:
        res = list(pool.map(lambda _: post(fault_server.http, data), range(8)))
    assert [r.status_code for r in res] == [200] * 8, [r.text for r in res if r.status_code != 200]
    assert all(matches(r.json()["detections"], want) for r in res)
    after = samples(fault_server.http)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)
    assert delta("rtmdet_oom_splits_total") >= 1  # a batch of >2 formed, ran out of memory, and was split
    assert delta("rtmdet_batch_failures_total") == 0
    assert delta("rtmdet_batch_size_sum") == 8  # every image ran exactly once, in sub-batches of <= 2
    assert delta("rtmdet_batch_size_bucket", le="2.0") == delta("rtmdet_batch_size_count")


def test_a_raising_model_step_fails_its_batch_and_the_worker_carries_on(fault_server, triggers, photos):
    data = jpeg(photos["chelsea"])
    triggers["raise"].touch()
    r = post(fault_server.http, data)
    assert r.status_code == 500
    assert "injected fault" in r.json()["detail"]
    assert not triggers["raise"].exists()
    assert httpx.get(f"{fault_server.http}/readyz", timeout=5).status_code == 200
    assert post(fault_server.http, data).status_code == 200


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_a_hung_model_step_trips_the_watchdog_and_readiness_tells_the_truth(fault_server, triggers, photos):
    data = jpeg(photos["chelsea"])
    before = samples(fault_server.http)
    triggers["hang"].touch()
    t0 = time.monotonic()
    stuck = post(fault_server.http, data)
    waited = time.monotonic() - t0
    assert stuck.status_code == 500 and "watchdog" in stuck.json()["detail"], stuck.text
    assert waited < HANG_S - 2.0  # answered by the watchdog, not after the hang
    # The stuck step is still sleeping: not ready (HTTP and gRPC health), yet requests still get answered.
    ready = httpx.get(f"{fault_server.http}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"].startswith("stalled"), ready.text
    deadline = time.monotonic() + 2
    while health_status(fault_server.grpc) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "gRPC health never turned NOT_SERVING"
        time.sleep(0.05)
    assert post(fault_server.http, data).status_code == 200  # the worker recovered on a fresh model thread
    # Once the stuck step returns, readiness comes back by itself.
    deadline = time.monotonic() + HANG_S + 5
    while httpx.get(f"{fault_server.http}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "readiness never came back"
        time.sleep(0.1)
    while health_status(fault_server.grpc) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "gRPC health never came back"
        time.sleep(0.05)
    snap = samples(fault_server.http)
    assert value(snap, "rtmdet_inference_timeouts_total") - value(before, "rtmdet_inference_timeouts_total") == 1
    assert value(snap, "rtmdet_inference_stalled") == 0


def test_the_fault_hook_is_off_unless_configured(server, fault_server):
    assert "fault injection is ON" in fault_server.log_path.read_text()
    assert "fault injection" not in server.log_path.read_text()
