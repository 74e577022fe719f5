"""The tight canvas through the service: settings, and each orientation on its own small canvas in the batcher."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from svc_helpers import png

from model import Detector, TestConfig
from service.backends import create_runner
from service.metrics import ServiceMetrics
from service.model_specs import parse_model_option
from service.pipeline import DetectionService
from service.registry import ModelRegistry
from service.schemas import DetectQuery
from service.settings import ServiceSettings

SIZE = 160


class RecordingRunner:
    """The real runner, recording the shape of every batch the batcher runs."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.shapes.append(tuple(batch.shape))
        return self.inner.forward(batch)


def test_the_canvas_is_a_setting_per_service_and_per_model(checkpoint, monkeypatch):
    monkeypatch.setenv("RTMDET_CANVAS", "tight")
    settings = ServiceSettings(weights=checkpoint)
    assert settings.default_spec().canvas == "tight"
    assert parse_model_option(f"a={checkpoint}", settings).canvas == "tight"
    assert parse_model_option(f"a={checkpoint},canvas=square", settings).canvas == "square"
    with pytest.raises(ValueError, match="canvas"):
        parse_model_option(f"a={checkpoint},canvas=round", settings)


def test_a_tight_canvas_service_runs_each_orientation_on_its_own_canvas(checkpoint, photos):
    """Through ONNX Runtime: the model spec's canvas reaches the runner, whose export then takes any canvas."""
    settings = ServiceSettings(weights=checkpoint, input_size=SIZE, canvas="tight", max_batch_size=4,
                               max_queue_delay_ms=300, decode_threads=2, warmup=False, accelerate="onnxruntime")
    metrics = ServiceMetrics()
    runners = []

    def factory(spec):
        runners.append(RecordingRunner(create_runner(spec)))
        return runners[-1]

    svc = DetectionService(settings, metrics, ModelRegistry(settings, metrics, runner_factory=factory))
    svc.load()
    try:
        info = svc.model_info(None)
        assert (info.canvas, info.runner) == ("tight", "onnxruntime")  # what GET /v1/models says
        landscape = photos["coffee"]  # 300 x 200: 160 x 107 at 160, a 128 x 160 canvas
        portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2))
        images = [landscape, portrait, landscape, portrait]
        runners[0].shapes.clear()  # the start-up probe's

        async def detect_all():
            return await asyncio.gather(*(svc.detect_encoded(None, png(img), DetectQuery(), None) for img in images))

        outcomes = asyncio.run(detect_all())
    finally:
        svc.shutdown()
    canvases = {s[1:3] for s in runners[0].shapes}
    assert canvases == {(128, 160), (160, 128)}, runners[0].shapes  # never the 160 x 160 square
    assert sum(s[0] for s in runners[0].shapes) == len(images)
    # Each answer is the Detector's own on the tight canvas, image by image.
    det = Detector.from_checkpoint(checkpoint, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE,
                                                                                        canvas="tight"))
    for img, outcome in zip(images, outcomes, strict=True):
        want = det([img])[0]
        assert len(want.boxes) > 0
        np.testing.assert_array_equal(outcome.detections.labels, want.labels)
        np.testing.assert_allclose(outcome.detections.boxes, want.boxes, atol=1e-3)


def test_the_slo_batcher_learns_its_first_times_on_a_tight_canvas(checkpoint):
    """With an SLO, the batcher times each batch size at start. On the tight canvas it times a 16:9 frame's canvas,
    not the square: a learned time too high is never corrected (too few requests admitted to form that batch)."""
    from service.batcher import DynamicBatcher

    det = Detector.from_checkpoint(checkpoint, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE,
                                                                                        canvas="tight"))
    runner = RecordingRunner(det.runner)
    det.runner = runner
    batcher = DynamicBatcher(det, ServiceMetrics().for_model("m"), max_batch_size=4, latency_slo_s=1.0)
    batcher.start()
    try:
        assert {s[1:3] for s in runner.shapes} == {(96, 160)}  # 160 x 90 rounded up to 32
        assert sorted({s[0] for s in runner.shapes}) == [1, 2, 4]
        assert set(batcher.times.snapshot()) == {1, 2, 4}
    finally:
        batcher.stop(timeout=10)
