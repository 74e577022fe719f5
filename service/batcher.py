"""Dynamic batcher: many concurrent requests in, one inference thread running batches.

Requests are *admitted* first (a bounded count: when `max_queue_size` requests are already waiting,
the next is refused at once with `QueueFull`), then decoded and letterboxed elsewhere, then queued
here. One worker thread takes the first queued request, adds whatever else is queued, and waits up
to `max_queue_delay` for more only while admitted requests are still on their way (being decoded):
with nothing coming, a lone request runs at once instead of paying the delay. Requests whose
deadline passed, or whose caller gave up, are dropped before inference. An exception in a batch
fails only that batch's requests; the worker carries on.

Faults in the model step: an out-of-memory error retries the batch split in halves (down to single
images) before any request fails. The step itself runs on a separate "model" thread watched by the
worker: past `inference_timeout_s` the batch's requests fail with `InferenceTimeout`, the stuck thread
is abandoned (Python cannot kill it) and the next batch runs on a fresh one; `stalled` counts stuck
steps still running, and readiness is off while it is non-zero.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

import torch

from model.inference.detections import Detections, DetectParams
from model.inference.preprocess import LetterboxInfo
from model.inference.runner import RunnerOutputs
from service.errors import BatchFailed, DeadlineExceeded, InferenceTimeout, NotAccepting, QueueFull
from service.metrics import ModelMetrics

log = logging.getLogger(__name__)

__all__ = ["BatchFailed", "DeadlineExceeded", "DetectParams", "DynamicBatcher", "InferenceTimeout", "NotAccepting",
           "QueueFull", "StageTimes", "Ticket"]


class BatchModel(Protocol):
    """What the batcher runs: a `model.Detector` (its runner's forward, its transform's post-processing)."""

    def forward(self, batch_uint8: torch.Tensor) -> RunnerOutputs: ...

    def postprocess(self, outputs: RunnerOutputs, infos: Sequence[LetterboxInfo], cfg=None,
                    params: Sequence[DetectParams] | None = None) -> list[Detections]: ...


@dataclass
class StageTimes:
    """Seconds per stage for one request; inference and postprocess are its batch's."""

    decode: float = 0.0
    preprocess: float = 0.0
    queue_wait: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    batch_size: int = 0
    trace_context: object = None  # the request's span context, for the batch span's links (service.tracing)


@dataclass
class _Job:
    batch: torch.Tensor  # (1, S, S, 3) uint8
    info: LetterboxInfo
    params: DetectParams
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    times: StageTimes
    ticket: Ticket
    enqueued_at: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the caller stopped waiting (deadline or cancellation)


class Ticket:
    """A place in the queue, held from admission until the worker takes the request."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._release_slot()


_STOP = object()


class DynamicBatcher:
    """One per loaded model version. Extension point for scheduling policies: `_gather` decides what
    forms a batch, `_live_jobs` what is dropped before it runs."""

    # Called on the worker thread after each batch that ran: (its requests' StageTimes, inference s,
    # postprocess s). service.tracing sets it when tracing is on; None costs nothing.
    on_batch = None

    def __init__(self, model: BatchModel, metrics: ModelMetrics, max_batch_size: int = 8,
                 max_queue_delay_s: float = 0.002, max_queue_size: int = 64, inference_timeout_s: float = 0.0,
                 max_stalled: int = 2) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.inference_timeout_s = inference_timeout_s  # 0: no watchdog
        self.max_stalled = max_stalled  # stuck model threads tolerated before batches fail at once
        self.stalled = 0  # model steps past the watchdog that have not returned yet
        self._model_thread = self._new_model_thread()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # admitted and not yet taken into a batch
        self._accepting = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._accepting = True
            self._thread = threading.Thread(target=self._work, name="rtmdet-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, end the worker."""
        self._accepting = False
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self._model_thread.shutdown(wait=False)

    @staticmethod
    def _new_model_thread() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix="rtmdet-model")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the request side (event loop) -------------------------------------------------------------
    def admit(self) -> Ticket:
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the service is not accepting requests")
            if self._admitted >= self.max_queue_size:
                self.metrics.rejected.inc()
                raise QueueFull(f"queue full ({self.max_queue_size} requests waiting); retry later")
            self._admitted += 1
            self.metrics.queue_depth.set(self._admitted)
        return Ticket(self)

    def _release_slot(self) -> None:
        with self._lock:
            self._admitted -= 1
            self.metrics.queue_depth.set(self._admitted)

    async def submit(self, ticket: Ticket, batch: torch.Tensor, info: LetterboxInfo, params: DetectParams,
                     deadline: float | None, times: StageTimes) -> Detections:
        """Queue one preprocessed image; wait for its detections (or the deadline)."""
        loop = asyncio.get_running_loop()
        job = _Job(batch, info, params, deadline, loop.create_future(), loop, times, ticket)
        self._queue.put(job)
        try:
            if deadline is None:
                return await job.future
            return await asyncio.wait_for(job.future, max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            job.abandoned = True
            raise DeadlineExceeded("deadline exceeded while waiting for inference") from None
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    # -- the worker thread -------------------------------------------------------------------------
    def _take(self, job: _Job) -> None:
        job.ticket.release()

    def _more_on_the_way(self) -> bool:
        with self._lock:
            return self._admitted > 0

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, stop = [first], False
        self._take(first)
        until = time.monotonic() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = until - time.monotonic()
                if remaining <= 0 or not self._more_on_the_way():
                    break
                try:
                    job = self._queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if job is _STOP:
                stop = True
                break
            self._take(job)
            batch.append(job)
        return batch, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)
            try:
                self._run_batch(batch)
            except Exception:  # never let the worker die; _run_batch already answered the requests
                log.exception("unexpected error in the batch worker")
        # Stopped: anything still queued (nothing, after a proper drain) gets an answer, not silence.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                self._take(job)
                self._fail(job, NotAccepting("the service stopped before this request ran"))

    def _live_jobs(self, batch: Sequence[_Job]) -> list[_Job]:
        now, live = time.monotonic(), []
        for job in batch:
            if job.abandoned or job.future.cancelled():
                self.metrics.drop("expired" if job.deadline and now >= job.deadline else "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self.metrics.drop("expired")
                self._fail(job, DeadlineExceeded("deadline exceeded while queued; dropped before inference"))
            else:
                job.times.queue_wait = now - job.enqueued_at
                self.metrics.observe_stage("queue_wait", job.times.queue_wait)
                live.append(job)
        return live

    def _run_batch(self, batch: Sequence[_Job]) -> None:
        live = self._live_jobs(batch)
        if not live:
            return
        try:
            results, sub_batches, t_inf, t_post = self._watched(live)
        except Exception as exc:
            self.metrics.batch_failures.inc()
            if isinstance(exc, BatchFailed):
                log.error("batch of %d failed: %s", len(live), exc)
                err = exc
            else:
                log.exception("inference failed for a batch of %d", len(live))
                err = BatchFailed(f"inference failed: {type(exc).__name__}: {exc}")
            for job in live:
                self._fail(job, err)
            return
        for n in sub_batches:
            self.metrics.batch_size.observe(n)
        self.metrics.observe_stage("inference", t_inf)
        self.metrics.observe_stage("postprocess", t_post)
        for job, dets in zip(live, results):
            job.times.inference, job.times.postprocess, job.times.batch_size = t_inf, t_post, len(live)
            self._resolve(job, dets)
        if self.on_batch is not None:
            self.on_batch([j.times for j in live], t_inf, t_post)

    def _watched(self, live: Sequence[_Job]):
        """The model step on the model thread, under the watchdog."""
        if self.stalled >= self.max_stalled:
            raise BatchFailed(f"the model is stalled ({self.stalled} steps stuck past the "
                              f"{self.inference_timeout_s:g} s watchdog); not running more until one returns")
        future = self._model_thread.submit(self._infer_splitting, live)
        try:
            return future.result(timeout=self.inference_timeout_s or None)
        except FutureTimeout:
            with self._lock:
                self.stalled += 1
            self.metrics.inference_timeouts.inc()
            self.metrics.stalled.set(self.stalled)
            future.add_done_callback(self._unstall)
            # The stuck thread keeps its executor; the next batch gets a fresh one.
            self._model_thread.shutdown(wait=False)
            self._model_thread = self._new_model_thread()
            raise InferenceTimeout(f"inference watchdog: the model step took longer than "
                                   f"{self.inference_timeout_s:g} s; the batch of {len(live)} was abandoned") from None

    def _unstall(self, _future) -> None:
        with self._lock:
            self.stalled -= 1
        self.metrics.stalled.set(self.stalled)
        log.warning("a stalled model step returned; %d still stuck", self.stalled)

    def _infer_splitting(self, live: Sequence[_Job]) -> tuple[list[Detections], list[int], float, float]:
        """Forward + postprocess; on out-of-memory, the two halves separately (recursively) before failing."""
        try:
            return self._infer(live)
        except torch.OutOfMemoryError:
            if len(live) == 1:
                raise
            self.metrics.oom_splits.inc()
            log.warning("out of memory on a batch of %d; retrying as %d + %d", len(live), len(live) // 2,
                        len(live) - len(live) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(live) // 2
            r1, b1, i1, p1 = self._infer_splitting(live[:half])
            r2, b2, i2, p2 = self._infer_splitting(live[half:])
            return r1 + r2, b1 + b2, i1 + i2, p1 + p2

    def _infer(self, live: Sequence[_Job]) -> tuple[list[Detections], list[int], float, float]:
        t0 = time.perf_counter()
        stacked = live[0].batch if len(live) == 1 else torch.cat([j.batch for j in live])
        outputs = self.model.forward(stacked)
        t1 = time.perf_counter()
        # Each request's own threshold, classes and count: the transform owns that policy.
        results = self.model.postprocess(outputs, [j.info for j in live], params=[j.params for j in live])
        t2 = time.perf_counter()
        return list(results), [len(live)], t1 - t0, t2 - t1

    @staticmethod
    def _resolve(job: _Job, value: Detections) -> None:
        def set_result() -> None:
            if not job.future.done():
                job.future.set_result(value)
        job.loop.call_soon_threadsafe(set_result)

    @staticmethod
    def _fail(job: _Job, exc: BaseException) -> None:
        def set_exception() -> None:
            if not job.future.done():
                job.future.set_exception(exc)
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            job.loop.call_soon_threadsafe(set_exception)
