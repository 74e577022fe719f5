"""The service's Prometheus metrics, declared once; both protocols record into the same objects.

Names follow Prometheus conventions (base units, `_total` counters, low-cardinality labels). Everything a
model's batcher does is labelled `model` (a name the operator configured, never one a client sent);
requests are labelled by protocol, endpoint (the route template, not the path) and status, and by the
model that answered (empty when none did, e.g. an unknown name).
Latency buckets start at 100 µs so GPU stages (sub-millisecond) resolve as well as CPU ones (tens of ms).
"""
from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("decode", "preprocess", "queue_wait", "inference", "postprocess")
MODEL_INFO_LABELS = ("model", "version", "name", "size", "backend", "device", "dtype", "input_size")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """All metrics of one service instance, on their own registry (so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("rtmdet_requests_total", "Requests answered, by protocol, endpoint, status and model",
                                ["protocol", "endpoint", "status", "model"], registry=r)
        self.request_latency = Histogram("rtmdet_request_duration_seconds",
                                         "End-to-end request latency as the server sees it",
                                         ["protocol", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("rtmdet_requests_in_flight", "Requests being handled", ["protocol"], registry=r)
        self.stage_latency = Histogram("rtmdet_stage_duration_seconds",
                                       "Time per pipeline stage (inference and postprocess are per batch)",
                                       ["stage", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.decode_scale = Counter("rtmdet_images_decoded_total",
                                    "Request images by the scale they were decoded at: 1 whole, or 1/2, 1/4, 1/8 "
                                    "for a large JPEG decoded reduced (RTMDET_REDUCED_DECODE)", ["scale", "model"],
                                    registry=r)
        self.batch_size = Histogram("rtmdet_batch_size", "Images per inference batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("rtmdet_queue_depth", "Requests admitted and waiting for an inference batch",
                                 ["model"], registry=r)
        self.dropped = Counter("rtmdet_batcher_dropped_total",
                               "Requests dropped before inference (deadline passed, or caller gone)",
                               ["reason", "model"], registry=r)
        self.rejected = Counter("rtmdet_batcher_rejected_total", "Requests refused because the queue was full",
                                ["model"], registry=r)
        self.refused = Counter("rtmdet_batcher_refused_total",
                               "Requests refused because the learned batch times say they would finish too "
                               "late: at admission (reason slo or deadline) or, after a misprediction, just "
                               "before their batch (reason late)", ["reason", "model"], registry=r)
        self.batch_predicted = Histogram("rtmdet_batch_predicted_seconds",
                                         "Model step time the batcher predicted for each batch it ran", ["model"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_actual = Histogram("rtmdet_batch_actual_seconds",
                                      "Model step time (forward + post-processing) each batch took; compare with "
                                      "rtmdet_batch_predicted_seconds", ["model"], buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.batch_time_margin = Gauge("rtmdet_batch_time_margin",
                                       "Factor on the mean predicted batch time that admission promises on (covers "
                                       "the ~95th percentile of the learned prediction errors; 1 = no spread seen)",
                                       ["model"], registry=r)
        self.batch_failures = Counter("rtmdet_batch_failures_total", "Batches whose inference raised", ["model"],
                                      registry=r)
        self.inference_timeouts = Counter("rtmdet_inference_timeouts_total",
                                          "Model steps abandoned by the inference watchdog", ["model"], registry=r)
        self.model_busy = Counter("rtmdet_model_busy_seconds_total", "Seconds with at least one batch running (its "
                                  "rate is the model's utilisation; overlapping batches count once)", ["model"],
                                  registry=r)
        self.batches_running = Gauge("rtmdet_batches_running", "Batches the model is running now (up to "
                                     "RTMDET_MAX_BATCHES_IN_FLIGHT where the runner takes overlapping calls)",
                                     ["model"], registry=r)
        self.stalled = Gauge("rtmdet_inference_stalled", "Abandoned model steps still running (readiness is off)",
                             ["model"], registry=r)
        self.oom_splits = Counter("rtmdet_oom_splits_total",
                                  "Batches split in halves and retried after running out of memory", ["model"],
                                  registry=r)
        self.reloads = Counter("rtmdet_model_reloads_total", "Model (re)loads, by outcome", ["model", "outcome"],
                               registry=r)
        self.versions_loaded = Gauge("rtmdet_model_versions_loaded",
                                     "Versions of a model in memory (2 while a reload drains the old one)", ["model"],
                                     registry=r)
        self.model_info = Gauge("rtmdet_model_info", "The model versions being served (value 1)",
                                list(MODEL_INFO_LABELS), registry=r)
        self.frozen_objects = Gauge("rtmdet_gc_frozen_objects", "Start-up objects frozen out of the garbage "
                                    "collector's full passes (RTMDET_FREEZE_HEAP)", registry=r)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)

    def set_model_info(self, labels: dict[str, str] | None, previous: dict[str, str] | None = None) -> None:
        """Swap the info series of a model: the new version's labels on, the old one's off."""
        if previous is not None:
            with contextlib.suppress(KeyError):  # already removed
                self.model_info.remove(*(previous[k] for k in MODEL_INFO_LABELS))
        if labels is not None:
            self.model_info.labels(**labels).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """The batcher-side metrics of one model, its label bound once."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self.model = model
        self.batch_size = metrics.batch_size.labels(model=model)
        self.queue_depth = metrics.queue_depth.labels(model=model)
        self.rejected = metrics.rejected.labels(model=model)
        self.batch_failures = metrics.batch_failures.labels(model=model)
        self.inference_timeouts = metrics.inference_timeouts.labels(model=model)
        self.stalled = metrics.stalled.labels(model=model)
        self.batches_running = metrics.batches_running.labels(model=model)
        self.model_busy = metrics.model_busy.labels(model=model)
        self.oom_splits = metrics.oom_splits.labels(model=model)
        self.batch_predicted = metrics.batch_predicted.labels(model=model)
        self.batch_actual = metrics.batch_actual.labels(model=model)
        self.batch_time_margin = metrics.batch_time_margin.labels(model=model)
        self._dropped = metrics.dropped
        self._decode_scale = metrics.decode_scale
        self._refused = metrics.refused
        self._stages = {stage: metrics.stage_latency.labels(stage=stage, model=model) for stage in STAGES}

    def drop(self, reason: str) -> None:
        self._dropped.labels(reason=reason, model=self.model).inc()

    def decoded(self, scale: str) -> None:
        self._decode_scale.labels(scale=scale, model=self.model).inc()

    def refuse(self, reason: str) -> None:
        self._refused.labels(reason=reason, model=self.model).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)


class RequestRecord:
    """One request's entry in the metrics, for either protocol: `finish(status)` once it is answered."""

    def __init__(self, metrics: ServiceMetrics, protocol: str, endpoint: str, in_flight: bool = True) -> None:
        self.metrics, self.protocol, self.endpoint = metrics, protocol, endpoint
        self.model = ""  # set once the request is routed to a configured model
        self._in_flight = in_flight
        self._t0 = time.perf_counter()
        if in_flight:
            metrics.in_flight.labels(protocol=protocol).inc()

    def finish(self, status: str) -> None:
        m = self.metrics
        if self._in_flight:
            m.in_flight.labels(protocol=self.protocol).dec()
        m.request_latency.labels(protocol=self.protocol, endpoint=self.endpoint).observe(time.perf_counter() - self._t0)
        m.requests.labels(protocol=self.protocol, endpoint=self.endpoint, status=status, model=self.model).inc()
