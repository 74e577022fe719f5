"""Two batches in flight (RTMDET_MAX_BATCHES_IN_FLIGHT): the batcher starts a second batch while one runs only once
a full batch is queued, each request still gets its own answer, only batches that ran alone teach the learned
batch times, stopping answers every running batch, and the service turns it on only where the runner takes
overlapping calls and no SLO is set.

The in-process tests run the real `DynamicBatcher`, the real Detector (RTMDet-tiny, its transform and NMS) and the
real runner; a wrapper around the runner counts the calls running at once and can hold a call until the test
lets it go, so that what overlaps is decided by the test, not by the machine's speed.
"""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from svc_helpers import png

from model import Detector, TestConfig
from model.inference.detections import DetectParams
from model.inference.streams import TorchStreams
from service.batcher import DynamicBatcher, InferenceTimeout, StageTimes
from service.metrics import ServiceMetrics
from service.pipeline import DetectionService
from service.registry import ModelRegistry, batches_in_flight
from service.schemas import DetectQuery
from service.settings import ServiceSettings

SIZE = 96
WAIT_S = 30.0  # the longest any step here may take; far beyond what each needs
PARAMS = DetectParams(0.05, 100)


class HeldRunner:
    """The real runner, taking overlapping calls; counts the calls running at once, and while `hold` is set each
    call waits (at most WAIT_S) until the test sets `go`."""

    overlapping_calls = True

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.hold = False
        self.hold_first_only = False  # with `hold`: only the first call waits
        self.go = threading.Event()
        self.active = self.most = 0
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        self.started = threading.Condition(self._lock)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.sizes.append(int(batch.shape[0]))
            first = len(self.sizes) == 1
            self.started.notify_all()
        try:
            if self.hold and (first or not self.hold_first_only):
                assert self.go.wait(WAIT_S), "the test never let the call go"
            time.sleep(self.delay_s)
            return self.inner.forward(batch)
        finally:
            with self._lock:
                self.active -= 1

    def wait_active(self, n: int) -> bool:
        with self.started:
            return self.started.wait_for(lambda: self.active >= n, timeout=WAIT_S)


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE))


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 255, (72 + 4 * i, 96, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture()
def make_batcher(detector):
    made = []

    def make(max_batch_size: int = 4, max_in_flight: int = 2, delay_s: float = 0.0, inference_timeout_s=WAIT_S):
        runner = HeldRunner(detector.runner, delay_s)
        held = Detector.from_runner(runner, detector.cfg)
        batcher = DynamicBatcher(held, ServiceMetrics().for_model("m"), max_batch_size, max_queue_delay_s=0.0,
                                 max_in_flight=max_in_flight, inference_timeout_s=inference_timeout_s)
        batcher.start()
        made.append(batcher)
        return batcher, runner

    yield make
    for b in made:
        b.stop(timeout=WAIT_S)


async def submit(batcher: DynamicBatcher, image: np.ndarray):
    ticket = batcher.admit()
    try:
        batch, infos = await asyncio.to_thread(batcher.model.preprocess, [image])
        return await batcher.submit(ticket, batch, infos[0], PARAMS, None, StageTimes())
    finally:
        ticket.release()


def queued(batcher: DynamicBatcher, n: int) -> bool:
    """Whether `n` requests are queued for the worker (within WAIT_S)."""
    end = time.monotonic() + WAIT_S
    while batcher._queue.qsize() < n:
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture()
def held_pairs(make_batcher):
    """A batcher of batches of 2 whose runner holds every call until the test sets `go`."""
    batcher, runner = make_batcher(max_batch_size=2)
    runner.hold = True
    return batcher, runner


async def two_running(batcher: DynamicBatcher, runner: HeldRunner) -> list[asyncio.Future]:
    """With batches of 2 and the runner holding its calls: a batch of one image, then a full batch of two, which
    starts beside it; both running when this returns (their requests' tasks)."""
    imgs = images(3)
    tasks = [asyncio.ensure_future(submit(batcher, imgs[0]))]
    assert await asyncio.to_thread(runner.wait_active, 1)
    tasks += [asyncio.ensure_future(submit(batcher, img)) for img in imgs[1:3]]
    assert await asyncio.to_thread(runner.wait_active, 2)
    return tasks


def rows(dets) -> np.ndarray:
    """Detections as (label, score, box) rows in a fixed order: boxes of equal score may come in either order."""
    table = np.column_stack([dets.labels, np.round(dets.scores, 4), np.round(dets.boxes, 1)])
    return table[np.lexsort(table.T[::-1])]


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose(rows(got), rows(want), atol=0.2)


def test_a_second_batch_starts_while_one_runs_only_once_a_full_batch_is_queued(make_batcher, detector):
    batcher, runner = make_batcher(max_batch_size=4)
    imgs = images(6)
    runner.hold = True

    async def scenario():
        first = asyncio.ensure_future(submit(batcher, imgs[0]))
        assert await asyncio.to_thread(runner.wait_active, 1)
        # Three queued: less than a full batch, so the worker waits for the running one.
        rest = [asyncio.ensure_future(submit(batcher, img)) for img in imgs[1:4]]
        assert await asyncio.to_thread(queued, batcher, 3)
        await asyncio.sleep(0.3)
        assert runner.active == 1 and runner.sizes == [1]
        # The fourth makes a full batch: it starts beside the first.
        rest += [asyncio.ensure_future(submit(batcher, imgs[4]))]
        assert await asyncio.to_thread(runner.wait_active, 2)
        assert runner.sizes == [1, 4]
        assert batcher.metrics.batches_running._value.get() == 2
        rest += [asyncio.ensure_future(submit(batcher, imgs[5]))]  # two running: this one waits for a slot
        await asyncio.sleep(0.6)
        assert runner.active == 2
        runner.go.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), WAIT_S)

    t0 = time.perf_counter()
    answers = asyncio.run(scenario())
    elapsed = time.perf_counter() - t0
    # Busy from the first batch's start to the last one's end, the 0.6 s of two batches counted once.
    busy = batcher.metrics.model_busy._value.get()
    assert 0.9 <= busy <= elapsed, (busy, elapsed)
    assert runner.most == 2 and runner.sizes == [1, 4, 1]
    want = [detector([img], detector.with_config(score_thr=PARAMS.score_threshold))[0] for img in imgs]
    assert sum(len(w) for w in want) > 0  # the comparison is of real boxes
    for got, w in zip(answers, want, strict=True):
        assert_same(got, w)
    assert batcher.metrics.batches_running._value.get() == 0


def test_one_at_a_time_with_max_in_flight_1(make_batcher):
    batcher, runner = make_batcher(max_batch_size=2, max_in_flight=1, delay_s=0.05)

    async def load():
        return await asyncio.gather(*(submit(batcher, img) for img in images(12)))

    t0 = time.perf_counter()
    assert len(asyncio.run(load())) == 12
    elapsed = time.perf_counter() - t0
    assert runner.most == 1
    # Six or more batches of at least 50 ms each, all counted by the time the answers are in.
    assert 0.05 * len(runner.sizes) <= batcher.metrics.model_busy._value.get() <= elapsed


def test_only_batches_that_ran_alone_teach_the_batch_times(held_pairs):
    batcher, runner = held_pairs

    async def overlapped():
        tasks = await two_running(batcher, runner)
        runner.go.set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

    asyncio.run(overlapped())
    assert runner.sizes == [1, 2]
    assert batcher.times.samples(1) == 0 and batcher.times.samples(2) == 0  # both shared the model

    async def alone():
        await submit(batcher, images(1)[0])

    asyncio.run(alone())
    assert batcher.times.samples(1) == 1


def test_stop_answers_every_running_batch(held_pairs):
    batcher, runner = held_pairs

    async def scenario():
        tasks = await two_running(batcher, runner)
        stopping = threading.Thread(target=batcher.stop, kwargs={"timeout": WAIT_S})
        stopping.start()
        await asyncio.sleep(0.2)
        assert stopping.is_alive()  # it waits for the running batches ...
        runner.go.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        await asyncio.to_thread(stopping.join, WAIT_S)
        assert not stopping.is_alive()  # ... and returns once they are answered
        return answers

    answers = asyncio.run(scenario())
    assert len(answers) == 3 and all(a is not None for a in answers)
    assert not batcher.running


def test_a_hung_batch_trips_the_watchdog_and_the_other_batch_runs_on(make_batcher):
    """The first batch hangs: the watchdog fails its request after its timeout, the batch beside it (and later ones,
    on a fresh model executor) answer normally, and the stalled count falls back to 0 once the hung step returns."""
    batcher, runner = make_batcher(max_batch_size=2, inference_timeout_s=2.0)
    imgs = images(5)
    runner.hold, runner.hold_first_only = True, True

    async def scenario():
        hung = asyncio.ensure_future(submit(batcher, imgs[0]))
        assert await asyncio.to_thread(runner.wait_active, 1)
        beside = await asyncio.wait_for(asyncio.gather(*(submit(batcher, img) for img in imgs[1:3])), WAIT_S)
        assert not hung.done()  # answered beside the hung batch, not after its watchdog
        with pytest.raises(InferenceTimeout, match="watchdog"):
            await asyncio.wait_for(hung, WAIT_S)
        assert batcher.stalled == 1
        later = await asyncio.wait_for(asyncio.gather(*(submit(batcher, img) for img in imgs[3:5])), WAIT_S)
        return beside + later

    answers = asyncio.run(scenario())
    assert len(answers) == 4 and runner.sizes[:2] == [1, 2]
    runner.go.set()  # the hung step returns
    end = time.monotonic() + WAIT_S
    while batcher.stalled and time.monotonic() < end:
        time.sleep(0.01)
    assert batcher.stalled == 0 and batcher.metrics.inference_timeouts._value.get() == 1


def test_an_slo_keeps_one_batch_at_a_time(detector):
    with pytest.raises(ValueError, match="one batch at a time"):
        DynamicBatcher(detector, ServiceMetrics().for_model("m"), 8, latency_slo_s=0.5, max_in_flight=2)
    with pytest.raises(ValueError, match="at least 1"):
        DynamicBatcher(detector, ServiceMetrics().for_model("m"), 8, max_in_flight=0)


def test_the_service_overlaps_batches_only_where_it_can_help(checkpoint):
    overlapping, plain = SimpleNamespace(overlapping_calls=True), SimpleNamespace(overlapping_calls=False)
    s = ServiceSettings(weights=checkpoint)
    assert s.max_batches_in_flight == 2
    assert batches_in_flight(s, overlapping, None) == 2
    assert batches_in_flight(s, plain, None) == 1  # ONNX Runtime, OpenVINO, CUDA graphs, Triton: one call at a time
    assert batches_in_flight(s, overlapping, 200.0) == 1  # an SLO
    assert batches_in_flight(ServiceSettings(weights=checkpoint, max_batch_size=1), overlapping, None) == 1
    assert batches_in_flight(ServiceSettings(weights=checkpoint, max_batches_in_flight=1), overlapping, None) == 1


def test_torch_streams_take_overlapping_calls_and_a_detector_says_whether_its_runner_does(detector):
    streams = TorchStreams(lambda x: ([x.float()], [x.float()]), threads=2)
    try:
        assert streams.overlapping_calls
        batch = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
        import torch

        x = torch.from_numpy(batch)
        outs = []
        threads = [threading.Thread(target=lambda: outs.append(streams(x))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert len(outs) == 4 and all(torch.equal(o[0][0], x.float()) for o in outs)
    finally:
        streams.close()
    assert Detector.from_runner(HeldRunner(detector.runner), detector.cfg).overlapping_calls
    assert not Detector.from_runner(SimpleNamespace(info=detector.runner.info, device=detector.runner.device),
                                    detector.cfg).overlapping_calls


def test_concurrent_requests_through_the_service_each_get_their_own_answer(checkpoint, detector):
    """The whole pipeline (decode, letterbox, batcher, the real eager runner) with batches overlapping: 16 different
    images at once, each answer equal to the Detector's for that image alone."""
    settings = ServiceSettings(weights=checkpoint, input_size=SIZE, max_batch_size=4, decode_threads=2, warmup=False,
                               score_threshold=PARAMS.score_threshold)
    runner = HeldRunner(detector.runner, delay_s=0.15)  # long enough for the next full batch to queue meanwhile
    svc = DetectionService(settings, registry=ModelRegistry(settings, ServiceMetrics(),
                                                            runner_factory=lambda spec: runner))
    svc.load()
    try:
        assert svc.registry.slot(None).current.batcher.max_in_flight == 2
        imgs = images(16)

        async def run():
            return await asyncio.gather(*(svc.detect_encoded(None, png(img), DetectQuery(), None) for img in imgs))

        outcomes = asyncio.run(run())
    finally:
        svc.shutdown()
    assert runner.most == 2
    want = [detector([img], detector.with_config(score_thr=PARAMS.score_threshold))[0] for img in imgs]
    assert sum(len(w) for w in want) > 0
    for got, w in zip(outcomes, want, strict=True):
        assert_same(got.detections, w)
