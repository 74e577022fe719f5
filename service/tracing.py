"""OpenTelemetry traces: a server span per request (the FastAPI and gRPC instrumentations), under it one
`rtmdet.detect` span per image with children `decode`, `preprocess`, `queue_wait`, `inference` and
`postprocess`; and one `rtmdet.batch` span per inference batch that links every image span that rode in it
(a batch serves many traces, so it cannot be a child of one).

Configured by the standard environment: tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, or `OTEL_TRACES_EXPORTER` names `otlp` or `console`; and off
when `OTEL_SDK_DISABLED=true`. Off (the default) means no provider, no instrumentation and no span objects:
the request path tests one attribute (`tracer is None`). Sampler, resource (`OTEL_SERVICE_NAME`) and batch
export settings are the SDK's own `OTEL_*` variables. Propagation is W3C `traceparent`.

Stage spans are written after the fact from the measured stage times (the batch runs on the worker thread,
the stages of one image are timed where they happen), with explicit start and end times.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

TRACER_NAME = "rtmdet.service"
REQUEST_ID_ATTR = "rtmdet.request_id"


def enabled_by_env(env=os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters == {"none"}:
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or exporters & {"otlp", "console"})


def setup_from_env(env=os.environ):
    """The SDK's TracerProvider with the exporters the environment asks for, or None (tracing off)."""
    if not enabled_by_env(env):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME", "rtmdet-serve")}))
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
    if "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_EXPORTER_OTLP_*
    if "console" in exporters:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


def shutdown(provider) -> None:
    if provider is not None:
        provider.shutdown()  # flushes what the batch processors still hold


def traceparent(span) -> str | None:
    """The W3C `traceparent` of `span` (what the server returns, so a client can find its trace)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _ns(t: float) -> int:
    return int(t * 1e9)


class ImageSpan:
    """One image's `rtmdet.detect` span and, once answered, its stage children."""

    def __init__(self, tracer, model: str, request_id: str | None, attributes: dict | None = None) -> None:
        self.tracer = tracer
        attrs = {"rtmdet.model": model, **(attributes or {})}
        if request_id:
            attrs[REQUEST_ID_ATTR] = request_id
        self.span = tracer.start_span("rtmdet.detect", kind=SpanKind.INTERNAL, attributes=attrs)
        self.context = trace.set_span_in_context(self.span)

    def stages(self, times, decode_start: float | None, enqueued: float | None) -> None:
        """Children from the measured `StageTimes`; `decode_start`/`enqueued` are `time.time()` values."""
        if decode_start is not None:
            t = decode_start
            for name, seconds in (("decode", times.decode), ("preprocess", times.preprocess)):
                self._child(name, t, t + seconds)
                t += seconds
        if enqueued is not None and times.batch_size:
            t = enqueued
            for name, seconds in (("queue_wait", times.queue_wait), ("inference", times.inference),
                                  ("postprocess", times.postprocess)):
                self._child(name, t, t + seconds, {"rtmdet.batch_size": times.batch_size})
                t += seconds

    def _child(self, name: str, start: float, end: float, attributes: dict | None = None) -> None:
        self.tracer.start_span(name, context=self.context, start_time=_ns(start),
                               attributes=attributes).end(end_time=_ns(end))

    def finish(self, version: str | None = None, detections: int | None = None,
               error: BaseException | None = None) -> None:
        if version:
            self.span.set_attribute("rtmdet.version", version)
        if detections is not None:
            self.span.set_attribute("rtmdet.detections", detections)
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


class BatchSpans:
    """The batcher's `on_batch` hook: one `rtmdet.batch` span per batch, linking its images' spans."""

    def __init__(self, tracer, model: str) -> None:
        self.tracer, self.model = tracer, model

    def __call__(self, times: Sequence, inference_s: float, postprocess_s: float) -> None:
        end = time.time()
        links = [Link(t.trace_context) for t in times if t.trace_context is not None]
        span = self.tracer.start_span("rtmdet.batch", links=links, start_time=_ns(end - inference_s - postprocess_s),
                                      attributes={"rtmdet.model": self.model, "rtmdet.batch_size": len(times),
                                                  "rtmdet.inference_ms": inference_s * 1000.0,
                                                  "rtmdet.postprocess_ms": postprocess_s * 1000.0},
                                      context=trace.set_span_in_context(trace.INVALID_SPAN))
        span.end(end_time=_ns(end))
