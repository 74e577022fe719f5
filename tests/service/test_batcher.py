"""The batcher on its own (in-process, real model): failures stay inside their batch, filtering is exact."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from svc_helpers import free_port, png

from model import Detector, TestConfig
from model.inference.detections import DetectParams
from service.backends import BackendUnavailable, create_runner
from service.errors import BatchFailed
from service.http_api import create_app
from service.pipeline import DetectionService
from service.registry import ModelRegistry
from service.schemas import DetectQuery
from service.settings import ServiceSettings

SIZE = 160


class FaultyRunner:
    """The real runner, with a switch that makes the next forward pass raise (fault injection)."""

    fail_next = False

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected fault")
        return self.inner.forward(batch)


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE))


@pytest.fixture(scope="module")
def service(detector, checkpoint):
    settings = ServiceSettings(weights=checkpoint, input_size=SIZE, max_batch_size=4, max_queue_delay_ms=20,
                               decode_threads=2, warmup=False)
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    runner = FaultyRunner(detector.runner)
    svc = DetectionService(settings, metrics, ModelRegistry(settings, metrics, runner_factory=lambda spec: runner))
    svc.load()
    svc.runner = runner
    yield svc
    svc.shutdown()


def detect_many(service: DetectionService, images: list[np.ndarray]) -> list:
    async def run():
        return await asyncio.gather(*(service.detect_encoded(None, png(img), DetectQuery(), None) for img in images),
                                    return_exceptions=True)
    return asyncio.run(run())


def test_an_exception_fails_only_its_batch_and_the_worker_carries_on(service, photos):
    imgs = [photos["coffee"]] * 3
    service.runner.fail_next = True
    failed = detect_many(service, imgs)
    assert all(isinstance(r, BatchFailed) for r in failed), failed
    assert "injected fault" in str(failed[0])
    ok = detect_many(service, imgs)
    assert all(not isinstance(r, Exception) for r in ok)
    assert service.metrics.batch_failures.labels(model="default")._value.get() == 1


def test_batch_failure_is_a_500_with_its_message_over_http(service, photos):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, manage_lifecycle=False), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/detect"
        service.runner.fail_next = True
        r = httpx.post(url, content=png(photos["coffee"]), headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 500 and "injected fault" in r.json()["detail"]
        r = httpx.post(url, content=png(photos["coffee"]), headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_batch_failure_is_internal_with_its_message_over_grpc(service, photos):
    import grpc

    from service.grpc_api import create_grpc_server
    from service.proto_gen.rtmdet.v1 import detector_pb2, detector_pb2_grpc

    async def run():
        server, _, port = create_grpc_server(service, "127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = detector_pb2_grpc.DetectorStub(ch)
                req = detector_pb2.DetectRequest(encoded=png(photos["coffee"]))
                service.runner.fail_next = True
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Detect(req, timeout=60)
                assert err.value.code() == grpc.StatusCode.INTERNAL and "injected fault" in err.value.details()
                assert (await stub.Detect(req, timeout=60)).width == 300
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_per_image_cuts_in_one_batch_equal_running_the_detector_with_each_images_settings(detector, photos):
    """The transform's batched post-processing with one DetectParams per image (what the batcher asks for)."""
    img = photos["astronaut"]
    asked = [DetectParams(0.3, 100), DetectParams(0.31, 5), DetectParams(0.3, 1000, frozenset({1})),
             DetectParams(0.305, 3, frozenset({0, 1})), DetectParams(0.3, 0)]
    batch, infos = detector.preprocess([img] * len(asked))
    got = detector.postprocess(detector.forward(batch), infos, params=asked)
    for g, p in zip(got, asked):
        want = detector([img], detector.with_config(score_thr=p.score_threshold, max_per_img=1_000_000))[0]
        keep = [i for i, lbl in enumerate(want.labels) if p.class_ids is None or lbl in p.class_ids]
        keep = keep[:p.max_detections]
        assert len(g) == len(keep) and (len(keep) > 0 or p.max_detections == 0)
        np.testing.assert_array_equal(g.labels, want.labels[keep])
        np.testing.assert_allclose(g.boxes, want.boxes[keep], atol=1e-3)
        np.testing.assert_allclose(g.scores, want.scores[keep], atol=1e-6)


def test_unknown_backends_say_so():
    with pytest.raises(ValueError, match="unknown backend"):
        ServiceSettings(backend="tensorrt")


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailable, match="not found"):
        create_runner(ServiceSettings(weights=tmp_path / "nope.pth").default_spec())
