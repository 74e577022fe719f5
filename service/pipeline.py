"""The detection service's core, shared by HTTP and gRPC: bytes -> decode -> letterbox -> batcher -> detections.

Decoding and letterboxing run on a thread pool sized to the cores (never on the event loop);
inference runs on the batcher's one worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from model.inference.detector import Detections
from service.backends import Backend, create_backend
from service.batcher import DeadlineExceeded, DetectParams, DynamicBatcher, NotAccepting, StageTimes
from service.imaging import decode_image, raw_to_bgr
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request parameter we cannot honour (HTTP 400, gRPC INVALID_ARGUMENT)."""


@dataclass
class DetectOutcome:
    detections: Detections
    image: np.ndarray  # the decoded BGR image (for rendering)
    times: StageTimes
    started: float  # time.perf_counter() when the request reached the pipeline

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


class DetectionService:
    """One model behind one batcher; `start()` loads and warms it, `shutdown()` stops the worker."""

    def __init__(self, settings: ServiceSettings, backend: Backend | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.backend = backend
        self.batcher: DynamicBatcher | None = None
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="rtmdet-decode")
        self.draining = False
        self.start_error: str | None = None
        self.log_start_error = True  # `rtmdet serve` turns this off: it reports the failure itself, in one line
        self._info: dict = {}
        self._class_index: dict[str, int] = {}
        self._start_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Blocking: build the backend, warm it up, start the batcher."""
        s = self.settings
        backend = self.backend or create_backend(s)
        if s.fault_injection is not None:
            from service.faults import FaultInjectingBackend
            backend = FaultInjectingBackend(backend, s.fault_injection)
        if s.warmup:
            t0 = time.perf_counter()
            backend.warmup(warmup_batch_sizes(s.max_batch_size))
            log.info("warmed up in %.2f s", time.perf_counter() - t0)
        elif hasattr(backend, "mark_ready"):
            backend.mark_ready()
        self.backend = backend
        info = backend.describe()
        info["version"] = (info.get("weights_sha256") or "unknown")[:12]
        self._info = info
        self._class_index = {name: i for i, name in enumerate(info["classes"])}
        self.metrics.model_info.info({k: str(info.get(k, "")) for k in
                                      ("name", "size", "version", "backend", "device", "dtype", "input_size")})
        batcher = DynamicBatcher(backend, self.metrics, s.max_batch_size, s.max_queue_delay_ms / 1000.0,
                                 s.max_queue_size, inference_timeout_s=s.inference_timeout_s)
        batcher.start()
        self.batcher = batcher

    def start(self) -> asyncio.Task:
        """Load in a thread; the same task for every caller."""
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        return self._start_task

    async def _start(self) -> None:
        try:
            await asyncio.to_thread(self.load)
        except Exception as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            if self.log_start_error:
                log.error("model failed to load: %s", self.start_error)
            raise

    def can_serve(self) -> bool:
        return (self.batcher is not None and self.batcher.running and self.backend is not None
                and self.backend.is_ready())

    def is_ready(self) -> bool:
        """What probes see: able to serve, not draining and no model step stuck past the watchdog (so
        load balancers stop sending new work)."""
        return not self.draining and self.can_serve() and self.batcher.stalled == 0

    def not_ready_reason(self) -> str:
        if self.draining:
            return "draining"
        if self.start_error:
            return "failed: " + self.start_error
        if self.batcher is not None and self.batcher.stalled:
            return (f"stalled: {self.batcher.stalled} model step(s) stuck past the "
                    f"{self.settings.inference_timeout_s:g} s inference watchdog")
        if self.batcher is not None and not self.batcher.running:
            return "failed: the batch worker stopped"
        return "loading"

    def shutdown(self) -> None:
        self.draining = True
        if self.batcher is not None:
            self.batcher.stop(timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        if not self._info:
            raise NotAccepting("the model is still loading")
        return dict(self._info)

    # -- requests ----------------------------------------------------------------------------------
    def params(self, score_threshold: float | None = None, max_detections: int | None = None,
               classes: Sequence[str] | None = None) -> DetectParams:
        if not self._info:
            raise NotAccepting("the model is still loading")
        s = self.settings
        thr = s.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= thr <= 1.0:
            raise InvalidRequest(f"score_threshold must be within [0, 1], got {thr}")
        top = s.max_detections if max_detections is None else int(max_detections)
        if not 1 <= top <= s.max_detections_limit:
            raise InvalidRequest(f"max_detections must be within [1, {s.max_detections_limit}], got {top}")
        ids = None
        names = [n.strip() for c in (classes or []) for n in c.split(",") if n.strip()]
        if names:
            unknown = [n for n in names if n not in self._class_index]
            if unknown:
                raise InvalidRequest(f"unknown classes {unknown}; the model knows {list(self._class_index)}")
            ids = frozenset(self._class_index[n] for n in names)
        return DetectParams(thr, top, ids)

    async def detect_encoded(self, data: bytes, params: DetectParams, deadline: float | None) -> DetectOutcome:
        s = self.settings
        return await self._detect(lambda: decode_image(data, s.max_upload_bytes, s.max_image_pixels), params,
                                  deadline)

    async def detect_raw(self, data: bytes, height: int, width: int, channels: int, rgb_order: bool,
                         params: DetectParams, deadline: float | None) -> DetectOutcome:
        s = self.settings
        return await self._detect(lambda: raw_to_bgr(data, height, width, channels, rgb_order, s.max_image_pixels),
                                  params, deadline)

    async def _detect(self, decode: Callable[[], np.ndarray], params: DetectParams,
                      deadline: float | None) -> DetectOutcome:
        started = time.perf_counter()
        # Draining does not refuse: a request that reached us was accepted before the listeners closed,
        # and accepted requests are answered.
        if not self.can_serve():
            raise NotAccepting("the model is not ready")
        batcher = self.batcher
        ticket = batcher.admit()  # QueueFull at once when the queue is full
        try:
            times = StageTimes()
            try:
                image, batch, infos = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self._decode_and_letterbox, decode, times)
            except asyncio.CancelledError:  # the caller went away (or its gRPC deadline passed) while decoding
                self.metrics.dropped.labels(reason="cancelled").inc()
                raise
            if deadline is not None and time.monotonic() >= deadline:
                self.metrics.dropped.labels(reason="expired").inc()
                raise DeadlineExceeded("deadline exceeded before inference; dropped")
            return DetectOutcome(await batcher.submit(ticket, batch, infos[0], params, deadline, times), image,
                                 times, started)
        finally:
            ticket.release()  # no-op once the worker took the request

    def _decode_and_letterbox(self, decode: Callable[[], np.ndarray], times: StageTimes):
        t0 = time.perf_counter()
        image = decode()
        t1 = time.perf_counter()
        batch, infos = self.backend.preprocess([image])
        t2 = time.perf_counter()
        times.decode, times.preprocess = t1 - t0, t2 - t1
        self.metrics.observe_stage("decode", times.decode)
        self.metrics.observe_stage("preprocess", times.preprocess)
        return image, batch, infos
