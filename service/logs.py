"""Logs an operator can follow: every line of a request carries its request id, and each request ends with
one access line (route, model, status, duration, stage timings). `RTMDET_LOG_FORMAT=json` writes one JSON
object a line; `text` (the default) a readable line with the same fields.

The request's context lives in a `ContextVar`, set by the HTTP middleware or the gRPC handler around the
request; the log filter copies it into every record logged meanwhile, whichever module logs.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

ACCESS = logging.getLogger("rtmdet.access")
REQUEST_ID_HEADER = "x-request-id"  # HTTP header and gRPC metadata key (gRPC keys are lower case)
# What we echo back and write into logs: a client's id when it is a plain token, else one of ours.
_GOOD_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_RECORD_FIELDS = ("request_id", "model", "route", "protocol", "status", "duration_ms", "stages", "shed_left_out")


def request_id_from(given: str | None) -> str:
    return given if given and _GOOD_ID.match(given) else uuid.uuid4().hex


@dataclass
class RequestContext:
    request_id: str
    protocol: str  # "http" or "grpc"
    route: str  # the route template or the gRPC method
    model: str = ""
    stages: list[dict] = field(default_factory=list)  # one dict of stage milliseconds per image
    started: float = field(default_factory=time.perf_counter)


current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("rtmdet_request", default=None)


@contextlib.contextmanager
def request_scope(request_id: str, protocol: str, route: str):
    """The request's context for everything logged inside; `finish` writes the access line."""
    ctx = RequestContext(request_id, protocol, route)
    token = current.set(ctx)
    try:
        yield ctx
    finally:
        current.reset(token)


def record_stages(model: str, stages: dict) -> None:
    ctx = current.get()
    if ctx is not None:
        ctx.model = ctx.model or model
        ctx.stages.append(stages)


class _ShedLines:
    """At most one access line a second for requests shed because the queue is full (503 /
    RESOURCE_EXHAUSTED), with the count left out since the last: under overload, a line per shed request
    would spend the CPU the service needs to recover (measured: bench/soak.py's overload run then misses its
    recovery bound). The metrics count every one (rtmdet_batcher_rejected_total)."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s, self.last, self.suppressed = period_s, -float("inf"), 0

    def admit(self) -> int | None:
        """None: leave this line out; else the number left out before it."""
        now = time.monotonic()
        if now - self.last < self.period_s:
            self.suppressed += 1
            return None
        left_out, self.last, self.suppressed = self.suppressed, now, 0
        return left_out


SHED = {"503", "RESOURCE_EXHAUSTED"}
_shed = _ShedLines()


def access(ctx: RequestContext, status: str | int) -> None:
    """The request's one access line (INFO on rtmdet.access; WARNING for 5xx and gRPC server errors)."""
    level = logging.WARNING if str(status)[:1] == "5" or status in SERVER_ERRORS else logging.INFO
    if not ACCESS.isEnabledFor(level):
        return
    extra = {"request_id": ctx.request_id, "status": str(status), "route": ctx.route, "protocol": ctx.protocol,
             "model": ctx.model, "stages": ctx.stages}
    if str(status) in SHED:
        left_out = _shed.admit()
        if left_out is None:
            return
        extra["shed_left_out"] = left_out
    duration = round((time.perf_counter() - ctx.started) * 1000.0, 3)
    extra["duration_ms"] = duration
    ACCESS.log(level, "%s %s %s %.1f ms", ctx.protocol, ctx.route, status, duration, extra=extra)


SERVER_ERRORS = {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


class RequestContextFilter(logging.Filter):
    """Copies the current request's id, model and route into each record (what the formatters print)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current.get()
        if ctx is not None:
            for name, value in (("request_id", ctx.request_id), ("route", ctx.route), ("protocol", ctx.protocol),
                                ("model", ctx.model)):
                if not getattr(record, name, None):
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in _RECORD_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid:
            line += f" request_id={rid}"
            model = getattr(record, "model", None)
            if model:
                line += f" model={model}"
        stages = getattr(record, "stages", None)
        if stages:
            line += " stages=" + json.dumps(stages, separators=(",", ":"))
        return line


def configure(fmt: str) -> None:
    """Root logging to stderr in the chosen format, at INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
