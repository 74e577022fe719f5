"""Dynamic batcher: many concurrent requests in, one worker thread forming batches (run one at a time, or two at
full load: "Two batches in flight" below).

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

Batching to a latency SLO (`latency_slo_s`, RTMDET_LATENCY_SLO_MS; off by default): every batch's model step
time is learned per batch size (`service.batch_times.BatchTimeModel`, seeded at start by timing each
warm-up size). Each request is *due* at its admission time plus the SLO (less `SLO_HEADROOM` for the
answer's own way out), or at its own deadline if that comes first. Admission predicts when a new request
would finish (the running batch's rest, the queue ahead in full batches, its own decode; batch times at the
high quantile of their learned error, not the mean) and refuses it at
once with `CannotMeetDeadline` (503 / RESOURCE_EXHAUSTED, Retry-After from the prediction) if that is past
its due time, instead of letting it time out later. The worker waits for more requests only while that
still lets the oldest request finish in time (and never longer than `max_queue_delay`, never with nothing
on the way: a lone request never waits), then takes a full batch (all it holds) while more than a batch is
admitted; with less, the count that lets the most finish by their due time (fewer only when that saves the
oldest and costs nobody behind it).

Two batches in flight (`max_in_flight`, RTMDET_MAX_BATCHES_IN_FLIGHT; the fixed-delay batcher, with a runner that
takes overlapping calls: `Detector.overlapping_calls`): while a batch runs, the worker starts the next one as soon as
a full batch is queued, instead of waiting for the first to end. The runner's stream threads then take the second
batch's chunks the moment they finish the first's, rather than waiting at the end of every batch for the stream
that a decode thread slowed, and the first batch's post-processing runs while the second computes. With less than a
full batch queued the worker waits for the running batch as before, so that the next batch fills up: below full
load nothing changes. The SLO batcher keeps one batch at a time: it learns the times of batches that run alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from model.inference.detections import Detections, DetectParams
from model.inference.preprocess import LetterboxInfo, join_batches, orientation_groups
from model.inference.runner import RunnerOutputs
from service.batch_times import BatchTimeModel
from service.errors import BatchFailed, CannotMeetDeadline, DeadlineExceeded, InferenceTimeout, NotAccepting, QueueFull
from service.metrics import ModelMetrics

log = logging.getLogger(__name__)

# The share of the SLO the batcher plans to use: the rest covers what it does not model (the answer's
# serialisation, the event loop, scheduling noise on a shared machine).
SLO_HEADROOM = 0.85
DECODE_ALPHA = 0.2  # EWMA weight for the admission-to-queue time (decode + letterbox)
SLOT_POLL_S = 0.05  # the longest a worker waiting for a batch slot sleeps before looking again

__all__ = ["BatchFailed", "CannotMeetDeadline", "DeadlineExceeded", "DetectParams", "DynamicBatcher",
           "InferenceTimeout", "NotAccepting", "QueueFull", "StageTimes", "Ticket"]


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

    def __init__(self, batcher: DynamicBatcher, due: float | None = None) -> None:
        self._batcher = batcher
        self._held = True
        self.admitted_at = time.monotonic()
        self.due = due  # with an SLO: when this request should be answered (time.monotonic())

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
                 max_stalled: int = 2, latency_slo_s: float | None = None, times: BatchTimeModel | None = None,
                 max_in_flight: int = 1) -> None:
        if latency_slo_s is not None and latency_slo_s <= 0:
            raise ValueError(f"latency_slo_s must be positive (or None: off), got {latency_slo_s}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if latency_slo_s is not None and max_in_flight > 1:
            raise ValueError("the SLO batcher runs one batch at a time (it learns the times of batches that ran "
                             f"alone); got max_in_flight={max_in_flight} with a latency SLO")
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.inference_timeout_s = inference_timeout_s  # 0: no watchdog
        self.max_stalled = max_stalled  # stuck model threads tolerated before batches fail at once
        self.stalled = 0  # model steps past the watchdog that have not returned yet
        self.max_in_flight = max_in_flight
        self._model_thread = self._new_model_thread()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Batches running (max_in_flight > 1): their sequence numbers, those that shared the model with another (their
        # times are not one batch's), and the threads that wait on their model steps.
        self._slot_free = threading.Condition(self._lock)
        self._running: set[int] = set()
        self._overlapped: set[int] = set()
        self._started = 0
        self._busy_mark = 0.0  # time.perf_counter() up to which busy time is counted, while a batch runs
        self._batch_threads = (ThreadPoolExecutor(max_in_flight, thread_name_prefix="rtmdet-batch")
                               if max_in_flight > 1 else None)
        self._admitted = 0  # admitted and not yet taken into a batch
        self._accepting = False
        self._thread: threading.Thread | None = None
        self.latency_slo_s = latency_slo_s
        self.times = times or BatchTimeModel()  # learned with or without an SLO (the metrics show it)
        self.decode_s = 0.0  # EWMA of admission -> queued (decode + letterbox)
        self._busy_until = 0.0  # predicted end of the batch now running (time.monotonic()); 0: idle
        self._held: deque[_Job] = deque()  # SLO mode: taken off the queue, not yet put in a batch (worker only)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            if self.latency_slo_s is not None and not self.times.known():
                self.calibrate()
            self._accepting = True
            self._thread = threading.Thread(target=self._work, name="rtmdet-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, end the worker."""
        self._accepting = False
        if self._thread is not None:
            self._queue.put(_STOP)
            with self._slot_free:
                self._slot_free.notify_all()
            self._thread.join(timeout)
            self._thread = None
        self._model_thread.shutdown(wait=False)
        if self._batch_threads is not None:
            self._batch_threads.shutdown(wait=False)

    def calibrate(self, repeats: int = 3) -> None:
        """Seed the learned times: the model step (forward + post-processing) on a blank image at batch sizes
        1, 2, 4, ... max_batch_size (the warm-up sizes): the fastest of `repeats` runs after one untimed run (a
        first call at a new shape pays kernel choices and allocations, seconds on some engines). The fastest,
        because a time learned too low is corrected by the next batch of that size, while one learned too high
        may never be: the batcher would not admit enough requests to form that batch."""
        preprocess = getattr(self.model, "preprocess", None)
        size = getattr(self.model, "input_size", None)
        if preprocess is None or size is None:
            return
        # On the tight canvas a 16:9 frame, the smallest canvas of the common photo shapes (640: 384 x 640): the
        # square's times would be too high for every other shape, and too high is what is never corrected.
        tight = getattr(getattr(self.model, "cfg", None), "canvas", "square") == "tight"
        one, infos = preprocess([np.zeros((round(size * 9 / 16) if tight else size, size, 3), np.uint8)])
        for n in sorted({min(2 ** i, self.max_batch_size) for i in range(self.max_batch_size.bit_length() + 1)}):
            batch = one.expand(n, *one.shape[1:]).contiguous()
            runs = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                self.model.postprocess(self.model.forward(batch), infos * n)
                runs.append(time.perf_counter() - t0)
            self.times.observe(n, min(runs[1:]))
        log.info("batch times learned at start: %s",
                 ", ".join(f"{n}: {t * 1000:.1f} ms" for n, t in sorted(self.times.snapshot().items())))

    def _new_model_thread(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="rtmdet-model")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the request side (event loop) -------------------------------------------------------------
    def admit(self, deadline: float | None = None) -> Ticket:
        """A place in the queue, or an exception: NotAccepting, QueueFull, or (with an SLO) CannotMeetDeadline
        when the prediction says this request would finish after its SLO or its `deadline` (monotonic)."""
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the service is not accepting requests")
            if self._admitted >= self.max_queue_size:
                self.metrics.rejected.inc()
                raise QueueFull(f"queue full ({self.max_queue_size} requests waiting); retry later")
            due = None
            if self.latency_slo_s is not None:
                due = self._check_due(time.monotonic(), deadline)
            self._admitted += 1
            self.metrics.queue_depth.set(self._admitted)
        return Ticket(self, due)

    def predicted_latency_s(self, now: float | None = None) -> float | None:
        """When a request admitted now would be answered, in seconds from now (None: nothing learned yet)."""
        with self._lock:
            return self._predicted_latency_s(time.monotonic() if now is None else now)

    def _predicted_latency_s(self, now: float) -> float | None:
        # Everything admitted and not yet in a batch is ahead of it; they run in full batches. A promise, so the
        # high quantile of the batch times (the learned error's margin on their means), not the mean.
        queue_s = self.times.time_for(self._admitted + 1, self.max_batch_size, high=True)
        if queue_s is None:
            return None
        return max(self._busy_until - now, 0.0) * self.times.margin() + queue_s + self.decode_s

    def _check_due(self, now: float, deadline: float | None) -> float:
        """The request's due time; raises CannotMeetDeadline if the prediction says it will miss it."""
        slo_due = now + self.latency_slo_s * SLO_HEADROOM
        due, reason = slo_due, "slo"
        if deadline is not None and deadline < slo_due:
            due, reason = deadline, "deadline"
        predicted = self._predicted_latency_s(now)
        if predicted is not None and now + predicted > due:
            self.metrics.refuse(reason)
            what = (f"its {self.latency_slo_s * 1000:g} ms latency SLO" if reason == "slo"
                    else "its deadline")
            raise CannotMeetDeadline(
                f"refused: with {self._admitted} requests ahead, this one would be answered in about "
                f"{predicted * 1000:.0f} ms, after {what}; retry later", reason, now + predicted - due)
        return due

    def _release_slot(self) -> None:
        with self._lock:
            self._admitted -= 1
            self.metrics.queue_depth.set(self._admitted)

    async def submit(self, ticket: Ticket, batch: torch.Tensor, info: LetterboxInfo, params: DetectParams,
                     deadline: float | None, times: StageTimes) -> Detections:
        """Queue one preprocessed image; wait for its detections (or the deadline)."""
        loop = asyncio.get_running_loop()
        job = _Job(batch, info, params, deadline, loop.create_future(), loop, times, ticket)
        self.decode_s += DECODE_ALPHA * (job.enqueued_at - ticket.admitted_at - self.decode_s)
        self._queue.put(job)
        if self._running:  # a worker may be waiting for a full batch to start a second one
            with self._slot_free:
                self._slot_free.notify()
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

    def _poll(self, wait_s):
        """The next queued job (or _STOP): at once if one is there, else waiting while `wait_s()` (the seconds
        still worth waiting, asked again every 0.5 ms) stays positive; None once it is not."""
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                remaining = wait_s()
                if remaining <= 0:
                    return None
                with contextlib.suppress(queue.Empty):
                    return self._queue.get(timeout=min(remaining, 0.0005))

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, stop = [first], False
        self._take(first)
        until = time.monotonic() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            job = self._poll(lambda: until - time.monotonic() if self._more_on_the_way() else 0.0)
            if job is None:
                break
            if job is _STOP:
                stop = True
                break
            self._take(job)
            batch.append(job)
        return batch, stop

    def _gather_to_slo(self, first: _Job, reading: bool) -> tuple[list[_Job], bool]:
        """SLO mode: wait while that still lets the oldest finish, then take the largest batch in time."""
        held, stop = self._held, False
        held.appendleft(first)
        wait_until = time.monotonic() + self.max_queue_delay_s

        def worth_waiting() -> float:
            with self._lock:
                on_the_way = self._admitted - len(held)
            if on_the_way <= 0:
                return 0.0
            until = wait_until
            bigger = self.times.predict(len(held) + 1)
            if held[0].ticket.due is not None and bigger is not None:
                until = min(until, held[0].ticket.due - bigger)
            return until - time.monotonic()

        while reading and len(held) < self.max_batch_size:
            job = self._poll(worth_waiting)
            if job is None:
                break
            if job is _STOP:
                stop = True
                break
            held.append(job)
        now = time.monotonic()
        batch = [held.popleft() for _ in range(self._batch_in_time(now))]
        for job in batch:
            self._take(job)
        return self._shed_late(batch, now), stop

    def _shed_late(self, batch: list[_Job], now: float) -> list[_Job]:
        """Requests the prediction says would be answered after their SLO even in this batch are answered now
        (CannotMeetDeadline, reason "late") instead of late: a late answer is no use to an SLO caller, and
        the model time goes to requests that can still make theirs. Only a misprediction (a stall, the
        machine slowing) gets a request here; admission keeps the queue within the SLO otherwise. Shedding
        judges by the mean time, not admission's high quantile: a request dropped here has already waited, and
        is dropped only when it is more likely late than not (with the margin, a batch that usually makes it
        would be emptied whenever the learned spread is wide)."""
        predicted = self.times.predict(len(batch))
        if predicted is None:
            return batch
        kept = []
        for job in batch:
            over = now + predicted - (job.ticket.admitted_at + self.latency_slo_s)
            if over > 0 and not job.abandoned:
                self.metrics.refuse("late")
                self._fail(job, CannotMeetDeadline(
                    f"dropped before inference: the batch would end about {over * 1000:.0f} ms after this "
                    f"request's {self.latency_slo_s * 1000:g} ms latency SLO; retry later", "late", over))
            else:
                kept.append(job)
        return kept

    def _batch_in_time(self, now: float) -> int:
        """How many to take from the head of `_held`. With more admitted than one batch holds (held, queued or
        still being decoded), all it can: a smaller batch would spare the oldest request a little time but cost
        throughput that everyone queued behind pays for, and admission counted on full batches (the oldest, if
        it would now end past its SLO, is shed instead: `_shed_late`). With no more than one batch's worth, the
        count that lets the most of them finish when due, the rest following in one more batch (the larger
        count on a tie): fewer only when that saves the oldest and costs nobody behind it."""
        held, most = self._held, min(len(self._held), self.max_batch_size)
        if self.times.predict(1) is None:
            return most  # nothing learned yet: batch as the fixed-delay batcher does
        with self._lock:
            backlog = self._admitted  # held ones included: a ticket is released when its request is taken
        if backlog > self.max_batch_size:
            return most
        dues = [job.ticket.due for job in held]
        best, fewest = most, None
        for k in range(most, 0, -1):
            first_end = now + self.times.predict(k)
            rest_end = first_end + self.times.predict(len(dues) - k)
            late = (sum(1 for d in dues[:k] if d is not None and d < first_end)
                    + sum(1 for d in dues[k:] if d is not None and d < rest_end))
            if fewest is None or late < fewest:
                best, fewest = k, late
        return best

    def _work(self) -> None:
        stop = False
        while True:
            if self.max_in_flight > 1:
                self._wait_for_slot()
            if self._held:  # SLO mode: requests left over from the last gather go first
                first = self._held.popleft()
            elif stop:
                break
            else:
                first = self._queue.get()
                if first is _STOP:
                    break
            if self.latency_slo_s is None:
                batch, stopped = self._gather(first)
            else:
                batch, stopped = self._gather_to_slo(first, reading=not stop)
            stop = stop or stopped
            if self.max_in_flight > 1:
                self._start_batch(batch)
                continue
            self.metrics.batches_running.set(1)
            self._busy_mark = time.perf_counter()
            try:
                self._run_batch(batch)
            except Exception:  # never let the worker die; _run_batch already answered the requests
                log.exception("unexpected error in the batch worker")
            finally:
                self.metrics.batches_running.set(0)
        if self.max_in_flight > 1:
            self._wait_for_running()
        # Stopped: anything still queued (nothing, after a proper drain) gets an answer, not silence.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                self._take(job)
                self._fail(job, NotAccepting("the service stopped before this request ran"))

    def _wait_for_slot(self) -> None:
        """Until the next batch may start: nothing running, or a free slot and a full batch queued (a second batch
        that starts half empty would cost throughput; waiting for the running one lets it fill). Woken by every
        queued request and every finished batch; the timeout only bounds a missed wake-up."""
        with self._slot_free:
            while self._running and not (len(self._running) < self.max_in_flight
                                         and self._queue.qsize() >= self.max_batch_size):
                self._slot_free.wait(timeout=SLOT_POLL_S)

    def _wait_for_running(self) -> None:
        """At stop: the batches still running finish (each bounded by the watchdog) before the worker ends."""
        with self._slot_free:
            while self._running:
                self._slot_free.wait(timeout=SLOT_POLL_S)

    def _start_batch(self, batch: list[_Job]) -> None:
        with self._lock:
            self._started += 1
            seq = self._started
            if self._running:
                self._overlapped |= self._running | {seq}
            else:  # a busy spell begins
                self._busy_mark = time.perf_counter()
            self._running.add(seq)
            self.metrics.batches_running.set(len(self._running))
        self._batch_threads.submit(self._run_counted, batch, seq)

    def _run_counted(self, batch: list[_Job], seq: int) -> None:
        try:
            self._run_batch(batch, seq)
        except Exception:  # never let a batch thread die silently; _run_batch already answered the requests
            log.exception("unexpected error in a batch thread")
        finally:
            with self._slot_free:
                self._running.discard(seq)
                self._overlapped.discard(seq)
                self.metrics.batches_running.set(len(self._running))
                self._slot_free.notify_all()

    def _count_busy(self) -> None:
        """A model step ended: the time since the last count, during which some batch ran, is busy time. Counted
        before the batch's answers go out, so a reader who has them sees it; two batches' time counts once."""
        with self._lock:
            now = time.perf_counter()
            self.metrics.model_busy.inc(max(now - self._busy_mark, 0.0))
            self._busy_mark = now

    def _ran_alone(self, seq: int | None) -> bool:
        """Whether batch `seq` had the model to itself (None: one batch at a time, always)."""
        if seq is None:
            return True
        with self._lock:
            return seq not in self._overlapped

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

    def _run_batch(self, batch: Sequence[_Job], seq: int | None = None) -> None:
        live = self._live_jobs(batch)
        if not live:
            return
        predicted = self.times.predict(len(live))
        self._busy_until = time.monotonic() + (predicted or 0.0)
        try:
            results, sub_batches, t_inf, t_post = self._watched(live)
        except Exception as exc:
            self._count_busy()
            self._busy_until = 0.0
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
        self._count_busy()
        self._busy_until = 0.0
        for n in sub_batches:
            self.metrics.batch_size.observe(n)
        # A batch run in parts (out of memory, or per orientation) is not its size's time, nor is one that shared the
        # model with another batch.
        if len(sub_batches) == 1 and self._ran_alone(seq):
            self.times.observe(len(live), t_inf + t_post)
            self.metrics.batch_actual.observe(t_inf + t_post)
            self.metrics.batch_time_margin.set(self.times.margin())
            if predicted is not None:
                self.metrics.batch_predicted.observe(predicted)
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
        with self._lock:  # not on an executor another batch thread is just replacing
            future = self._model_thread.submit(self._infer_splitting, live)
        try:
            return future.result(timeout=self.inference_timeout_s or None)
        except FutureTimeout:
            with self._lock:
                self.stalled += 1
            self.metrics.inference_timeouts.inc()
            self.metrics.stalled.set(self.stalled)
            future.add_done_callback(self._unstall)
            # The stuck thread keeps its executor; the next batch gets a fresh one (a batch still running on the old
            # executor finishes there).
            with self._lock:
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
        # Canvases of one shape (the square canvas, or one camera's frames) run as one batch. Tight canvases of
        # both orientations run as a batch per orientation, each padded to the largest canvas in it
        # (model.inference.preprocess.orientation_groups).
        groups = orientation_groups([tuple(j.batch.shape[1:3]) for j in live])
        results: list[Detections | None] = [None] * len(live)
        forward_s = post_s = 0.0
        for group in groups:
            jobs = [live[i] for i in group]
            t0 = time.perf_counter()
            outputs = self.model.forward(join_batches([j.batch for j in jobs]))
            t1 = time.perf_counter()
            # Each request's own threshold, classes and count: the transform owns that policy.
            found = self.model.postprocess(outputs, [j.info for j in jobs], params=[j.params for j in jobs])
            forward_s, post_s = forward_s + t1 - t0, post_s + time.perf_counter() - t1
            for i, dets in zip(group, found, strict=True):
                results[i] = dets
        return results, [len(g) for g in groups], forward_s, post_s

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
