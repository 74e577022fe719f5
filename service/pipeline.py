"""The detection service's core, shared by HTTP and gRPC: bytes -> decode -> letterbox -> batcher -> detections.

Decoding and letterboxing run on a thread pool sized to the cores (never on the event loop); inference runs
on the batcher of the model version the request leased (see `service.registry`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from model.inference.detections import Detections, DetectParams
from model.inference.detector import Detector
from model.inference.preprocess import LetterboxInfo
from service import logs
from service.batcher import StageTimes
from service.errors import DeadlineExceeded, InvalidRequest, ServiceError, TooManyImages
from service.imaging import DecodedImage, decode_image_to_fit, raw_to_bgr
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry, ModelVersion
from service.schemas import DetectQuery, ModelInfo, ModelList
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class DetectOutcome:
    detections: Detections  # in the original image's pixels
    decoded: DecodedImage  # the BGR image as decoded (smaller than the original after a reduced JPEG decode)
    times: StageTimes
    started: float  # time.perf_counter() when the request reached the pipeline
    model: str
    version: str
    network: str  # "rtmdet-tiny", ...
    size: str

    @property
    def image(self) -> np.ndarray:
        return self.decoded.image

    @property
    def height(self) -> int:
        return self.decoded.height

    @property
    def width(self) -> int:
        return self.decoded.width


class DetectionService:
    """The registry of models plus what requests share: the decode pool, the metrics, the drain flag."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None,
                 registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.registry = registry or ModelRegistry(settings, self.metrics)
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="rtmdet-decode")
        self.draining = False
        self.loaded = False  # every start-up model loaded
        self.tracer = None  # an OpenTelemetry Tracer when tracing is on (service.tracing); None: no spans at all
        self.start_error: str | None = None
        self.log_start_error = True  # `rtmdet serve` turns this off: it reports the failure itself, in one line
        self._start_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Blocking: load, warm and check every configured model."""
        self.registry.load_all()
        self.loaded = True

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

    def is_ready(self, model: str | None = None) -> bool:
        """What probes see: not draining, the start-up loads done, and every loaded version (or the one named)
        able to serve with no model step stuck past the watchdog (so load balancers stop sending new work).
        A model unloaded on purpose, or one added later whose load failed, does not take the others down."""
        if self.draining:
            return False
        if model is not None:
            versions = [self.registry.slot(model).current]
        else:
            if not self.loaded:
                return False
            versions = [s.current for s in self.registry.slots() if s.current is not None]
        return bool(versions) and all(v is not None and v.can_serve() and v.batcher.stalled == 0 for v in versions)

    def not_ready_reason(self, model: str | None = None) -> str:
        if self.draining:
            return "draining"
        if self.start_error:
            return "failed: " + self.start_error
        for slot in [self.registry.slot(model)] if model else self.registry.slots():
            v = slot.current
            if v is None and model is None and self.loaded:
                continue  # unloaded on purpose, or added later and failed: not the server's readiness
            if v is None:
                return f"{slot.name}: {slot.state}" + (f": {slot.error}" if slot.error else "")
            if v.batcher.stalled:
                return (f"stalled: {v.batcher.stalled} model step(s) of {slot.name} stuck past the "
                        f"{self.settings.inference_timeout_s:g} s inference watchdog")
            if not v.batcher.running:
                return f"failed: the batch worker of {slot.name} stopped"
            if not v.can_serve():
                return f"{slot.name}: its engine is not ready"
        return "loading"

    def shutdown(self) -> None:
        self.draining = True
        self.registry.shutdown(timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- what is served ------------------------------------------------------------------------------
    def model_info(self, name: str | None) -> ModelInfo:
        slot = self.registry.slot(name)
        v = slot.current
        base = dict(model=slot.name, state=slot.state, default=slot.name == self.registry.default_name,
                    weights=str(slot.spec.weights), error=slot.error)
        if v is None:
            return ModelInfo(name="", size=slot.spec.size, version="", classes=[], input_size=0, device="", dtype="",
                             weights_sha256=None, backend=slot.spec.backend, **base)
        i = v.detector.info
        choice = v.detector.auto_choice
        return ModelInfo(name=i.name, size=i.size, version=v.version, classes=list(v.detector.class_names),
                         input_size=v.detector.input_size, device=i.device, dtype=i.dtype,
                         weights_sha256=i.weights_sha256, backend=i.backend, runner=i.accelerate or i.backend,
                         runner_choice=choice.summary() if choice is not None else None,
                         sparse_regression=i.sparse_regression, canvas=v.detector.cfg.canvas, **base)

    def model_list(self) -> ModelList:
        return ModelList(default=self.registry.default_name, models=[self.model_info(n) for n in self.registry.names()])

    # -- requests ----------------------------------------------------------------------------------
    def params(self, version: ModelVersion, query: DetectQuery) -> DetectParams:
        s = self.settings
        thr = s.score_threshold if query.score_threshold is None else float(query.score_threshold)
        if not 0.0 <= thr <= 1.0:
            raise InvalidRequest(f"score_threshold must be within [0, 1], got {thr}")
        top = s.max_detections if query.max_detections is None else int(query.max_detections)
        if not 1 <= top <= s.max_detections_limit:
            raise InvalidRequest(f"max_detections must be within [1, {s.max_detections_limit}], got {top}")
        ids = None
        names = [n.strip() for c in (query.classes or []) for n in c.split(",") if n.strip()]
        if names:
            unknown = [n for n in names if n not in version.class_index]
            if unknown:
                raise InvalidRequest(f"unknown classes {unknown}; model {version.name!r} knows "
                                     f"{list(version.class_index)}")
            ids = frozenset(version.class_index[n] for n in names)
        return DetectParams(thr, top, ids)

    async def detect_many(self, model: str | None, images: list[bytes], query: DetectQuery,
                          deadline: float | None) -> list[DetectOutcome | ServiceError]:
        """Several encoded images, each admitted and batched like a request of its own (so they may share
        batches with each other and with other requests); a failing image gives its error in its place."""
        cap = self.settings.max_images_per_request
        if len(images) > cap:
            raise TooManyImages(f"{len(images)} images in one request; the limit is {cap} "
                                "(RTMDET_MAX_IMAGES_PER_REQUEST)")
        results = await asyncio.gather(*(self.detect_encoded(model, data, query, deadline, index=i)
                                         for i, data in enumerate(images)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ServiceError):
                raise r  # a bug or a cancellation is the whole request's, not one image's
        return list(results)

    async def detect_encoded(self, model: str | None, data: bytes, query: DetectQuery,
                             deadline: float | None, index: int | None = None,
                             full_size: bool = False) -> DetectOutcome:
        """`full_size`: decode every pixel even where a reduced JPEG decode would do (the render routes draw
        on the image, and answer at the size that was sent)."""
        s = self.settings
        reduce = s.reduced_decode and not full_size
        return await self._detect(model, lambda fit: decode_image_to_fit(data, s.max_upload_bytes, s.max_image_pixels,
                                                                         fit if reduce else None),
                                  query, deadline, index)

    async def detect_raw(self, model: str | None, data: bytes, height: int, width: int, channels: int,
                         rgb_order: bool, query: DetectQuery, deadline: float | None,
                         index: int | None = None) -> DetectOutcome:
        s = self.settings
        return await self._detect(model, lambda fit: DecodedImage.full(
            raw_to_bgr(data, height, width, channels, rgb_order, s.max_image_pixels)), query, deadline, index)

    async def _detect(self, model: str | None, decode: Callable[[int], DecodedImage], query: DetectQuery,
                      deadline: float | None, index: int | None = None) -> DetectOutcome:
        if self.tracer is None:
            return await self._detect_untraced(model, decode, query, deadline)
        from service.tracing import ImageSpan

        ctx = logs.current.get()
        span = ImageSpan(self.tracer, model or self.registry.default_name, ctx.request_id if ctx else None,
                         {"rtmdet.image_index": index} if index is not None else None)
        try:
            out = await self._detect_untraced(model, decode, query, deadline, span)
        except BaseException as exc:
            span.finish(error=exc)
            raise
        span.finish(out.version, len(out.detections.scores))
        return out

    async def _detect_untraced(self, model: str | None, decode: Callable[[int], DecodedImage], query: DetectQuery,
                               deadline: float | None, span=None) -> DetectOutcome:
        started = time.perf_counter()
        # Draining does not refuse: a request that reached us was accepted before the listeners closed,
        # and accepted requests are answered. The lease keeps this version open until the answer is out,
        # even if a reload swaps in another meanwhile.
        with self.registry.lease(model) as version:
            params = self.params(version, query)
            batcher = version.batcher
            # QueueFull at once when the queue is full; with an SLO, CannotMeetDeadline when it would be late.
            ticket = batcher.admit(deadline)
            mm = batcher.metrics
            times = StageTimes()
            decode_start = enqueued = None
            try:
                try:
                    decode_start = time.time()
                    decoded, batch, infos = await asyncio.get_running_loop().run_in_executor(
                        self.pool, self._decode_and_letterbox, version, decode, times)
                except asyncio.CancelledError:  # the caller went away (or its gRPC deadline passed) while decoding
                    mm.drop("cancelled")
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    mm.drop("expired")
                    raise DeadlineExceeded("deadline exceeded before inference; dropped")
                if span is not None:
                    self._trace_batches(version, span)
                    times.trace_context = span.span.get_span_context()
                enqueued = time.time()
                dets = await batcher.submit(ticket, batch, infos[0], params, deadline, times)
            finally:
                ticket.release()  # no-op once the worker took the request
                if span is not None:
                    span.stages(times, decode_start if times.decode or times.preprocess else None, enqueued)
                logs.record_stages(version.name, stage_ms(times))
            info = version.detector.info
            return DetectOutcome(dets, decoded, times, started, version.name, version.version, info.name, info.size)

    def _trace_batches(self, version: ModelVersion, span) -> None:
        """Make this version's batcher write batch spans (its hook; set once per version, here because
        versions come and go with reloads)."""
        if version.batcher.on_batch is None:
            from service.tracing import BatchSpans

            version.batcher.on_batch = BatchSpans(self.tracer, version.name)

    @staticmethod
    def _decode_and_letterbox(version: ModelVersion, decode: Callable[[int], DecodedImage], times: StageTimes):
        t0 = time.perf_counter()
        decoded = decode(version.detector.input_size)
        t1 = time.perf_counter()
        batch, infos = letterbox_decoded(version.detector, decoded)
        t2 = time.perf_counter()
        times.decode, times.preprocess = t1 - t0, t2 - t1
        mm = version.batcher.metrics
        mm.observe_stage("decode", times.decode)
        mm.observe_stage("preprocess", times.preprocess)
        mm.decoded(decoded.scale)
        return decoded, batch, infos


def letterbox_decoded(detector: Detector, decoded: DecodedImage) -> tuple[torch.Tensor, list[LetterboxInfo]]:
    """One decoded image as a batch of 1, its letterbox info mapping boxes to the original's pixels (also after a
    reduced JPEG decode)."""
    batch, infos = detector.preprocess([decoded.image])
    if decoded.reduced:
        infos = [infos[0].for_original(decoded.height, decoded.width)]
    return batch, infos


def stage_ms(t: StageTimes) -> dict:
    """One image's stage times in milliseconds, for the access log line."""
    return {"decode_ms": round(t.decode * 1e3, 3), "preprocess_ms": round(t.preprocess * 1e3, 3),
            "queue_ms": round(t.queue_wait * 1e3, 3), "inference_ms": round(t.inference * 1e3, 3),
            "postprocess_ms": round(t.postprocess * 1e3, 3), "batch_size": t.batch_size}
