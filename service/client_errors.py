"""What a failed call of the Python clients raises, for both protocols and both the sync and async clients.

Every error is a `DetectorError` with `status` (the HTTP status, the gRPC code name, or None when no answer
came), the server's `message`, the `protocol` and the number of `attempts` made. Its kind says what a caller
can do about it:

- `BadRequest`: the server refused the request for what it is (HTTP 4xx, gRPC INVALID_ARGUMENT,
  UNAUTHENTICATED, an image over the size limits, ...). Never retried.
- `Unavailable`: the server is overloaded or not (yet) serving (HTTP 503/429, gRPC UNAVAILABLE, gRPC
  RESOURCE_EXHAUSTED for a full queue, a refused or dropped connection). Retried; raised once the attempts or
  the call's deadline run out.
- `DeadlineExceeded` (also a `TimeoutError`): the call's deadline passed (HTTP 504, gRPC DEADLINE_EXCEEDED, or
  no answer in time).
- `ServerError`: the server failed (HTTP 500, gRPC INTERNAL, ...).

So that code written against the plain clients keeps working, an error from a gRPC client is also a
`grpc.RpcError` (`.code()`, `.details()`), and one from an HTTP client an `httpx.HTTPStatusError` (with
`.response`) when the server answered, else an `httpx.TransportError`.
"""
from __future__ import annotations

import email.utils
import functools
import ssl
import time

import grpc
import httpx


class DetectorError(Exception):
    retryable = False

    def __init__(self, message: str, *, status: int | str | None, protocol: str,
                 retry_after: float | None = None) -> None:
        Exception.__init__(self, message)
        self.message, self.status, self.protocol, self.retry_after = message, status, protocol, retry_after
        self.attempts = 1

    def __str__(self) -> str:
        where = self.protocol if self.status is None else f"{self.protocol} {self.status}"
        tail = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{where}: {self.message}{tail}"

    def __reduce__(self):
        # Pickled (e.g. to another process) as its plain kind: the httpx/grpc face does not travel.
        return _rebuild, (self.kind, self.message, self.status, self.protocol, self.retry_after, self.attempts)

    @property
    def kind(self) -> type[DetectorError]:
        """BadRequest, Unavailable, ...: the class without its httpx/grpc face."""
        return next(c for c in type(self).__mro__ if c in _KINDS)


class BadRequest(DetectorError):
    """Refused for what the request is; sending it again gets the same answer."""


class Unavailable(DetectorError):
    """Overloaded or not serving now; worth trying again (after `retry_after` seconds when the server said)."""

    retryable = True


class DeadlineExceeded(DetectorError, TimeoutError):
    """The call's deadline passed before an answer came."""


class ServerError(DetectorError):
    """The server failed while handling the request."""


_KINDS = frozenset({DetectorError, BadRequest, Unavailable, DeadlineExceeded, ServerError})


def _rebuild(kind, message, status, protocol, retry_after, attempts) -> DetectorError:
    err = kind(message, status=status, protocol=protocol, retry_after=retry_after)
    err.attempts = attempts
    return err


class _GrpcStatus(grpc.RpcError):
    """The grpc.RpcError face of an error from a gRPC client."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.status] if self.status in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return self.message

    def trailing_metadata(self):
        return getattr(self, "_trailing", None)


@functools.cache
def _flavoured(kind: type[DetectorError], legacy: type[Exception]) -> type:
    return type(kind.__name__, (kind, legacy), {"__module__": __name__, "__qualname__": kind.__qualname__})


def _make(kind: type[DetectorError], legacy: type[Exception], message: str, *, status, protocol: str,
          retry_after: float | None = None, **legacy_attrs) -> DetectorError:
    err = _flavoured(kind, legacy)(message, status=status, protocol=protocol, retry_after=retry_after)
    for name, value in legacy_attrs.items():
        setattr(err, name, value)  # setattr, not __dict__: httpx keeps `request` behind a property
    return err


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` value: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def http_error(response: httpx.Response) -> DetectorError:
    """The error for a non-2xx answer, with the server's `detail` as the message."""
    status = response.status_code
    try:
        body = response.json()
        message = str(body.get("detail", body)) if isinstance(body, dict) else str(body)
    except ValueError:
        message = response.text[:500] or response.reason_phrase
    if status in (429, 503):
        kind = Unavailable
    elif status == 504:
        kind = DeadlineExceeded
    elif 400 <= status < 500:
        kind = BadRequest
    else:
        kind = ServerError
    return _make(kind, httpx.HTTPStatusError, message, status=status, protocol="HTTP",
                 retry_after=parse_retry_after(response.headers.get("retry-after")),
                 request=response.request, response=response)


def http_transport_error(exc: httpx.TransportError) -> DetectorError:
    """The error for a call that got no answer: timed out, or the connection failed (worth a retry: a
    detection has no side effects, so sending it again is safe)."""
    legacy: type[Exception] = httpx.TransportError
    if isinstance(exc, httpx.TimeoutException):
        kind, message = DeadlineExceeded, f"no answer within the call's deadline ({type(exc).__name__})"
    elif _tls_failure(exc):  # a certificate this client does not trust (or lacks): the same on every try
        kind, message, legacy = BadRequest, f"TLS: {type(exc).__name__}: {exc}", type(exc)
    elif isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        kind, message = Unavailable, f"{type(exc).__name__}: {exc}"
    else:  # a bad URL, a proxy error, ...: sending it again will not help
        kind, message = BadRequest, f"{type(exc).__name__}: {exc}"
    try:
        attrs = {"request": exc.request}
    except RuntimeError:  # httpx raises when the error carries no request
        attrs = {}
    return _make(kind, legacy, message, status=None, protocol="HTTP", **attrs)


def _tls_failure(exc: BaseException) -> bool:
    """Whether a failed connection failed in the TLS handshake's certificate checks (an `ssl.SSLError` under
    httpx's and httpcore's wrappers, or only its text when the chain was not kept)."""
    seen = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def grpc_retry_after(metadata) -> tuple[float | None, bool]:
    """(seconds to wait, whether a retry is allowed) from trailing metadata: `retry-after` (seconds) or
    gRPC's `grpc-retry-pushback-ms` (gRFC A6: a negative value means "do not retry")."""
    for key, value in metadata or ():
        if key == "grpc-retry-pushback-ms":
            try:
                ms = int(value)
            except ValueError:
                return None, False
            return (ms / 1000.0, True) if ms >= 0 else (None, False)
        if key == "retry-after":
            return parse_retry_after(str(value)), True
    return None, True


_GRPC_BAD_REQUEST = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED})


def grpc_error(exc: grpc.RpcError) -> DetectorError:
    """The error for a failed gRPC call (sync or grpc.aio).

    RESOURCE_EXHAUSTED means two things on this server: overload (a full queue, an SLO refusal: retry) or an
    image over the size limits (never retry). Every overload answer carries a `retry-after` trailer
    (service/errors.py), and a `retry-after` / `grpc-retry-pushback-ms` trailer marks any status as retryable
    after that wait; a server of before the trailer is still understood by its message ("queue full ...").
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(code)
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    retry_after, may_retry = grpc_retry_after(trailing)
    overloaded = code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        retry_after is not None or details.startswith("queue full"))
    if code == grpc.StatusCode.UNAVAILABLE or overloaded:
        kind = Unavailable
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = DeadlineExceeded
    elif code in _GRPC_BAD_REQUEST:
        kind = BadRequest
    elif code == grpc.StatusCode.CANCELLED:
        kind = DetectorError
    else:
        kind = ServerError
    err = _make(kind, _GrpcStatus, details, status=code.name, protocol="gRPC", retry_after=retry_after)
    err._trailing = trailing
    if not may_retry:
        err.retryable = False
    return err


def deadline_error(protocol: str, attempts: int) -> DetectorError:
    legacy = _GrpcStatus if protocol == "gRPC" else httpx.TransportError
    status = "DEADLINE_EXCEEDED" if protocol == "gRPC" else None
    return _make(DeadlineExceeded, legacy, f"the call's deadline passed before attempt {attempts}",
                 status=status, protocol=protocol)
