"""The service's Prometheus metrics, declared once; both protocols record into the same objects.

Names follow Prometheus conventions (base units, `_total` counters, low-cardinality labels).
Latency buckets start at 100 µs so GPU stages (sub-millisecond) resolve as well as CPU ones (tens of ms).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("decode", "preprocess", "queue_wait", "inference", "postprocess")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """All metrics of one service instance, on their own registry (so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("rtmdet_requests_total", "Requests answered, by protocol, endpoint and status",
                                ["protocol", "endpoint", "status"], registry=r)
        self.request_latency = Histogram("rtmdet_request_duration_seconds",
                                         "End-to-end request latency as the server sees it",
                                         ["protocol", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_latency = Histogram("rtmdet_stage_duration_seconds",
                                       "Time per pipeline stage (inference and postprocess are per batch)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rtmdet_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("rtmdet_queue_depth", "Requests admitted and waiting for an inference batch",
                                 registry=r)
        self.in_flight = Gauge("rtmdet_requests_in_flight", "Requests being handled", ["protocol"], registry=r)
        self.dropped = Counter("rtmdet_batcher_dropped_total",
                               "Requests dropped before inference (deadline passed, or caller gone)",
                               ["reason"], registry=r)
        self.rejected = Counter("rtmdet_batcher_rejected_total", "Requests refused because the queue was full",
                                registry=r)
        self.batch_failures = Counter("rtmdet_batch_failures_total", "Batches whose inference raised", registry=r)
        self.inference_timeouts = Counter("rtmdet_inference_timeouts_total",
                                          "Model steps abandoned by the inference watchdog", registry=r)
        self.stalled = Gauge("rtmdet_inference_stalled", "Abandoned model steps still running (readiness is off)",
                             registry=r)
        self.oom_splits = Counter("rtmdet_oom_splits_total",
                                  "Batches split in halves and retried after running out of memory", registry=r)
        self.model_info = Info("rtmdet_model", "The model being served", registry=r)
        for stage in STAGES:  # expose every stage from the start, not after its first observation
            self.stage_latency.labels(stage=stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_latency.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
