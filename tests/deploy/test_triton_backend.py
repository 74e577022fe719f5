"""RTMDET_BACKEND=triton against a real Triton Inference Server on 127.0.0.1: the same detections as
the PyTorch detector; readiness follows Triton's; a Triton that goes away makes the service unready and
its requests fail fast with 503; when Triton comes back, so does the service."""
import time

import cv2
import httpx
import numpy as np
import pytest

from model import Detector, TestConfig
from model.export import export_onnx
from model.triton_repo import TritonModelConfig, write_triton_repository
from service.backends.triton import TritonRunner
from service.settings import TritonSettings
from tests.deploy.triton_server import TritonServer
from tests.service.svc_helpers import CLASS_NAMES, ServerProcess, jpeg

SIZE = 256


@pytest.fixture(scope="module")
def triton(net, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    onnx_path = tmp / "model.onnx"
    export_onnx(net, onnx_path, CLASS_NAMES, input_size=SIZE, dynamic_batch=True)
    repo = tmp / "repo"
    write_triton_repository(onnx_path, repo, TritonModelConfig(backend="python", instance_kind="KIND_CPU",
                                                               max_batch_size=4, preferred_batch_sizes=(4,)))
    server = TritonServer(repo, tmp / "triton.log").start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def settings(triton, **kw) -> TritonSettings:
    return TritonSettings(url=triton.grpc, model="rtmdet", startup_timeout_s=10, **kw)


def test_triton_backend_gives_the_pytorch_detections(triton, net, photos):
    runner = TritonRunner(settings(triton))
    try:
        backend = Detector.from_runner(runner, TestConfig.serving(input_size=640))
        assert backend.input_size == SIZE  # read from Triton's model config
        assert backend.class_names == CLASS_NAMES  # from the config's rtmdet.* parameters
        backend.warmup([1, 5])  # 5 > max_batch_size 4: sent as two requests
        assert runner.is_ready()
        got = backend(photos)
        want = Detector(net, CLASS_NAMES, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE))(photos)
        assert all(len(w) > 3 for w in want)
        for g, w in zip(got, want):
            assert g.labels.tolist() == w.labels.tolist()
            np.testing.assert_allclose(g.scores, w.scores, atol=1e-4)
            np.testing.assert_allclose(g.boxes, w.boxes, atol=0.05)
        assert backend.describe()["backend"] == "triton"
    finally:
        runner.close()


def test_unreachable_triton_fails_start_up_quickly():
    from service.backends import BackendUnavailable

    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="not ready after"):
        TritonRunner(TritonSettings(url="127.0.0.1:9", startup_timeout_s=1.0))
    assert time.monotonic() - t0 < 10


def post(srv, image) -> httpx.Response:
    return httpx.post(f"{srv.http}/detect", content=jpeg(image, 100), headers={"content-type": "image/jpeg"},
                      timeout=30)


def wait_for(predicate, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def test_service_follows_triton_readiness_and_fails_fast_when_it_is_gone(triton, net, photos, tmp_path):
    srv = ServerProcess(tmp_path / "unused.pth", tmp_path / "server.log", RTMDET_BACKEND="triton",
                        RTMDET_TRITON_URL=triton.grpc, RTMDET_TRITON_HEALTH_INTERVAL_S="0.5",
                        RTMDET_TRITON_TIMEOUT_S="5", RTMDET_INPUT_SIZE=str(SIZE), RTMDET_MAX_BATCH_SIZE="4")
    try:
        srv.wait_ready(timeout=120)
        info = httpx.get(f"{srv.http}/v1/model", timeout=10).json()
        assert info["backend"] == "triton" and info["classes"] == CLASS_NAMES
        image = photos[2]
        r = post(srv, image)
        assert r.status_code == 200
        decoded = cv2.imdecode(np.frombuffer(jpeg(image, 100), np.uint8), cv2.IMREAD_COLOR)
        (want,) = Detector(net, CLASS_NAMES, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE))([decoded])
        got = r.json()["detections"]
        assert len(got) > 3 and [d["class_name"] for d in got] == want.class_names[: len(got)]
        np.testing.assert_allclose([d["box"] for d in got], want.boxes[: len(got)], atol=0.05)

        triton.stop()  # Triton goes away
        wait_for(lambda: httpx.get(f"{srv.http}/readyz", timeout=2).status_code == 503, timeout=10)
        t0 = time.monotonic()
        r = post(srv, image)
        assert r.status_code == 503 and time.monotonic() - t0 < 2.0  # refused at once, not hung
        assert httpx.get(f"{srv.http}/healthz", timeout=2).status_code == 200  # alive: no restart needed

        triton.start()  # and comes back on the same port
        wait_for(lambda: httpx.get(f"{srv.http}/readyz", timeout=2).status_code == 200, timeout=60)
        assert post(srv, image).status_code == 200
    finally:
        srv.stop()
