"""Every error the service answers with, and how each protocol says it: one table for HTTP and gRPC.

A `ServiceError` carries its HTTP status, its gRPC status code (by name, so this module needs no gRPC
import) and any HTTP headers the answer needs. `http_api` and `grpc_api` translate by reading these
attributes; neither keeps a mapping of its own.
"""
from __future__ import annotations


class ServiceError(Exception):
    http_status: int = 500
    grpc_code: str = "INTERNAL"
    headers: dict[str, str] = {}  # read-only class default


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
