"""Every error the service answers with, and how each protocol says it: one table for HTTP and gRPC.

A `ServiceError` carries its HTTP status, its gRPC status code (by name, so this module needs no gRPC
import) and any HTTP headers the answer needs. `http_api` and `grpc_api` translate by reading these
attributes; neither keeps a mapping of its own.
"""
from __future__ import annotations

import math


class ServiceError(Exception):
    http_status: int = 500
    grpc_code: str = "INTERNAL"
    headers: dict[str, str] = {}  # read-only class default

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """What gRPC sends in the trailers: a `Retry-After` goes out as `retry-after` (gRPC has no header of
        its own for it)."""
        retry = self.headers.get("Retry-After")
        return (("retry-after", retry),) if retry else ()


class InvalidRequest(ServiceError, ValueError):
    """A request parameter or image we cannot honour."""

    http_status, grpc_code = 400, "INVALID_ARGUMENT"


class TooManyImages(ServiceError):
    """More images in one call than RTMDET_MAX_IMAGES_PER_REQUEST (HTTP 413, like any too-large request)."""

    http_status, grpc_code = 413, "INVALID_ARGUMENT"


class Unauthorized(ServiceError):
    """Missing or wrong bearer key."""

    http_status, grpc_code = 401, "UNAUTHENTICATED"
    headers = {"WWW-Authenticate": "Bearer"}


class ModelNotFound(ServiceError, LookupError):
    """No model by that name (the message names the known ones)."""

    http_status, grpc_code = 404, "NOT_FOUND"


class BodyTimeout(ServiceError):
    """The request body did not arrive before the request's deadline (a slow or stalled upload)."""

    http_status, grpc_code = 408, "DEADLINE_EXCEEDED"
    headers = {"Connection": "close"}


class ReloadFailed(ServiceError):
    """A new version failed to load or failed its check; the old version keeps serving."""

    http_status, grpc_code = 422, "FAILED_PRECONDITION"


class QueueFull(ServiceError):
    """The model's queue holds `max_queue_size` requests already."""

    http_status, grpc_code = 503, "RESOURCE_EXHAUSTED"
    headers = {"Retry-After": "1"}


class CannotMeetDeadline(ServiceError):
    """Refused at admission: with the queue ahead, the learned batch times say this request would finish after
    its latency SLO (`reason="slo"`) or its own deadline (`reason="deadline"`). `retry_after_s` is when the
    prediction says the queue will have drained enough."""

    http_status, grpc_code = 503, "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s
        # HTTP's Retry-After is whole seconds (RFC 9110); gRPC also gets the milliseconds.
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (*super().trailing_metadata(), ("retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000)))))


class NotAccepting(ServiceError):
    """Not serving: still loading, stopped, or the model's batcher is gone."""

    http_status, grpc_code = 503, "UNAVAILABLE"
    headers = {"Retry-After": "1"}


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its batch ran."""

    http_status, grpc_code = 504, "DEADLINE_EXCEEDED"


class BatchFailed(ServiceError):
    """Inference raised for the batch this request was in."""

    http_status, grpc_code = 500, "INTERNAL"


class InferenceTimeout(BatchFailed):
    """The model step ran past the watchdog's limit."""


class BackendUnavailable(ServiceError, RuntimeError):
    """A runner cannot be built (bad or missing weights, unreachable engine)."""

    http_status, grpc_code = 503, "UNAVAILABLE"
