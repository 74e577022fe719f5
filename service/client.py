"""Python clients for both protocols, sync and async; all return the JSON shape of POST /detect.

- `HttpDetectorClient` / `AsyncHttpDetectorClient` (httpx.Client / httpx.AsyncClient)
- `GrpcDetectorClient` / `AsyncGrpcDetectorClient` (grpc / grpc.aio)

Each call has a deadline (`timeout` seconds: the client's default, or per call) covering every attempt;
overload and lost connections are retried by a `RetryPolicy` (service/client_retry.py); failures raise the
errors of service/client_errors.py. `detect_many` runs many images with bounded concurrency
(service/client_many.py). A sync and an async client share their request building and response parsing
(the `_Http` and `_Grpc` bases); only the send differs.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Self

import grpc
import httpx
import numpy as np

from service.client_errors import (
    BadRequest,
    DeadlineExceeded,
    DetectorError,
    ServerError,
    Unavailable,
    grpc_error,
    http_error,
    http_transport_error,
)
from service.client_many import ImageResult, iterate_sync, run_many, single_image_group
from service.client_retry import NO_RETRY, RetryEvent, RetryPolicy, call_with_retries, call_with_retries_async
from service.tls import client_ssl_context

__all__ = ["AsyncGrpcDetectorClient", "AsyncHttpDetectorClient", "BadRequest", "DeadlineExceeded",
           "DetectorError", "GrpcDetectorClient", "HttpDetectorClient", "ImageResult", "NO_RETRY", "RetryEvent",
           "RetryPolicy", "ServerError", "Unavailable", "response_to_dict"]

ImageInput = bytes | str | os.PathLike
MAX_TIMEOUT_MS = 86_400_000  # the largest `timeout_ms` the server accepts

PathLike = str | os.PathLike


def _read_optional(path: PathLike | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _image_bytes(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class _AsyncClient:
    """What every async client has: `async with` and `detect_many` over its `detect`."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def detect_many(self, images: Iterable, concurrency: int = 8, ordered: bool = True,
                    **params) -> AsyncIterator[ImageResult]:
        """An `ImageResult` per image (paths, bytes, arrays for gRPC, or (name, image) pairs), at most
        `concurrency` requests in flight; in input order (`ordered`, the default) or as they complete.
        `params`: those of `detect`."""
        return run_many(lambda group: single_image_group(lambda im: self.detect(im, **params), group),
                        images, concurrency, ordered)


class _SyncClient:
    """What every sync client has: `with`, and `detect_many`: that of its async twin (same settings), run on a
    private event loop with its own connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def detect_many(self, images: Iterable, concurrency: int = 8, ordered: bool = True,
                    **params) -> Iterator[ImageResult]:
        async def results() -> AsyncIterator[ImageResult]:
            async with self._async_twin() as client, contextlib.aclosing(
                    client.detect_many(images, concurrency=concurrency, ordered=ordered, **params)) as many:
                async for r in many:
                    yield r
        return iterate_sync(results)
    detect_many.__doc__ = _AsyncClient.detect_many.__doc__


class _Http:
    """What the sync and async HTTP clients share: settings, request building, response parsing."""

    _client_class: type  # httpx.Client or httpx.AsyncClient

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, *, retry: RetryPolicy | None = None,
                 verify: ssl.SSLContext | str | bool = True, ca: PathLike | None = None,
                 cert: PathLike | None = None, key: PathLike | None = None) -> None:
        """`timeout`: the default deadline of a call, in seconds, over all its attempts. `verify`: for https
        URLs, an `ssl.SSLContext` (client certificates go there) or a CA bundle path, as httpx takes it; or
        `ca` (the CA file that signed the server's certificate) and `cert`/`key` (this client's certificate
        and key, for a server that demands one: mTLS), from which that context is made."""
        if ca or cert or key:
            verify = client_ssl_context(ca, cert, key)
        self._settings = dict(base_url=base_url, api_key=api_key, timeout=timeout, retry=retry, verify=verify)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = self._client_class(base_url=base_url, headers=headers, timeout=timeout, verify=verify)

    @staticmethod
    def _query(score_threshold=None, max_detections=None, classes=None, timeout_ms=None) -> dict:
        q: dict = {}
        if score_threshold is not None:
            q["score_threshold"] = score_threshold
        if max_detections is not None:
            q["max_detections"] = max_detections
        if classes:
            q["classes"] = list(classes)
        if timeout_ms is not None:
            q["timeout_ms"] = timeout_ms
        return q

    def _post_image(self, path: str, data: bytes, content_type: str, params: dict) -> Callable[[float], dict]:
        """The request of one attempt, given the seconds left: unless the caller chose a `timeout_ms`, the
        server gets what is left of the deadline, so it drops the request when the client stops waiting."""
        def build(left: float) -> dict:
            query = self._query(**params)
            query.setdefault("timeout_ms", min(MAX_TIMEOUT_MS, max(1, int(left * 1000))))
            return dict(method="POST", url=path, content=data, headers={"Content-Type": content_type},
                        params=query, timeout=left)
        return build

    @staticmethod
    def _get(path: str) -> Callable[[float], dict]:
        return lambda left: dict(method="GET", url=path, timeout=left)

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if not response.is_success:
            raise http_error(response)
        return response


class HttpDetectorClient(_Http, _SyncClient):
    """`HttpDetectorClient("http://127.0.0.1:8000").detect("cat.jpg")` -> dict."""

    _client_class = httpx.Client

    def close(self) -> None:
        self.http.close()

    def _send(self, build: Callable[[float], dict], timeout: float | None) -> httpx.Response:
        def attempt(left: float) -> httpx.Response:
            try:
                return self._checked(self.http.request(**build(left)))
            except httpx.TransportError as exc:
                raise http_transport_error(exc) from exc
        return call_with_retries(self.retry, timeout or self.timeout, "HTTP", attempt)

    def detect(self, image: ImageInput, score_threshold: float | None = None, max_detections: int | None = None,
               classes: Sequence[str] | None = None, timeout_ms: float | None = None,
               content_type: str = "image/jpeg", model: str | None = None, *, timeout: float | None = None) -> dict:
        """Sends the bytes as the raw body; the server sniffs the real type, so any supported one works.
        `model`: a served model's name (default: the server's default model)."""
        params = dict(score_threshold=score_threshold, max_detections=max_detections, classes=classes,
                      timeout_ms=timeout_ms)
        return self._send(self._post_image(_detect_path(model), _image_bytes(image), content_type, params),
                          timeout).json()

    def render(self, image: ImageInput, score_threshold: float | None = None, max_detections: int | None = None,
               classes: Sequence[str] | None = None, timeout_ms: float | None = None, model: str | None = None, *,
               timeout: float | None = None) -> bytes:
        params = dict(score_threshold=score_threshold, max_detections=max_detections, classes=classes,
                      timeout_ms=timeout_ms)
        return self._send(self._post_image(_detect_path(model) + "/render", _image_bytes(image), "image/jpeg",
                                           params), timeout).content

    def model(self, name: str | None = None, *, timeout: float | None = None) -> dict:
        return self._send(self._get(_model_path(name)), timeout).json()

    def models(self, *, timeout: float | None = None) -> list[dict]:
        return self._send(self._get("/v1/models"), timeout).json()["models"]

    def reload(self, name: str, weights: str | None = None, admin_key: str | None = None) -> dict:
        """Load a new version of `name` (from `weights`, else its current file) and swap it in once checked.
        Not retried: a reload is not idempotent."""
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        r = self.http.post(f"/v1/models/{name}/reload", json={"weights": weights} if weights else None,
                           headers=headers)
        r.raise_for_status()
        return r.json()

    def _async_twin(self) -> AsyncHttpDetectorClient:
        return AsyncHttpDetectorClient(**self._settings)


class AsyncHttpDetectorClient(_Http, _AsyncClient):
    """`await AsyncHttpDetectorClient(url).detect("cat.jpg")` -> dict; the sync client's methods, awaited."""

    _client_class = httpx.AsyncClient

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, build: Callable[[float], dict], timeout: float | None) -> httpx.Response:
        async def attempt(left: float) -> httpx.Response:
            try:
                return self._checked(await self.http.request(**build(left)))
            except httpx.TransportError as exc:
                raise http_transport_error(exc) from exc
        return await call_with_retries_async(self.retry, timeout or self.timeout, "HTTP", attempt)

    async def detect(self, image: ImageInput, score_threshold: float | None = None,
                     max_detections: int | None = None, classes: Sequence[str] | None = None,
                     timeout_ms: float | None = None, content_type: str = "image/jpeg", model: str | None = None, *,
                     timeout: float | None = None) -> dict:
        params = dict(score_threshold=score_threshold, max_detections=max_detections, classes=classes,
                      timeout_ms=timeout_ms)
        data = await asyncio.to_thread(_image_bytes, image)  # file reads stay off the event loop
        return (await self._send(self._post_image(_detect_path(model), data, content_type, params), timeout)).json()

    async def render(self, image: ImageInput, score_threshold: float | None = None,
                     max_detections: int | None = None, classes: Sequence[str] | None = None,
                     timeout_ms: float | None = None, model: str | None = None, *,
                     timeout: float | None = None) -> bytes:
        params = dict(score_threshold=score_threshold, max_detections=max_detections, classes=classes,
                      timeout_ms=timeout_ms)
        data = await asyncio.to_thread(_image_bytes, image)
        return (await self._send(self._post_image(_detect_path(model) + "/render", data, "image/jpeg", params),
                                 timeout)).content

    async def model(self, name: str | None = None, *, timeout: float | None = None) -> dict:
        return (await self._send(self._get(_model_path(name)), timeout)).json()

    async def models(self, *, timeout: float | None = None) -> list[dict]:
        return (await self._send(self._get("/v1/models"), timeout)).json()["models"]



def response_to_dict(resp) -> dict:
    """A gRPC DetectResponse as the JSON of POST /detect (same rounding as the HTTP server)."""
    t = resp.timing
    return {
        "width": resp.width, "height": resp.height,
        "model": {"name": resp.model.name, "size": resp.model.size, "version": resp.model.version,
                  "model": resp.model.model},
        "detections": [{"box": [round(v, 2) for v in (d.box.x1, d.box.y1, d.box.x2, d.box.y2)],
                        "score": round(d.score, 4), "label": d.label, "class_name": d.class_name}
                       for d in resp.detections],
        "timing": {"decode_ms": t.decode_ms, "preprocess_ms": t.preprocess_ms, "queue_ms": t.queue_ms,
                   "inference_ms": t.inference_ms, "postprocess_ms": t.postprocess_ms, "total_ms": t.total_ms,
                   "batch_size": t.batch_size},
    }


def model_info_to_dict(info) -> dict:
    from google.protobuf.json_format import MessageToDict
    return MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _detect_path(model: str | None) -> str:
    return f"/v1/models/{model}/detect" if model else "/detect"


def _model_path(model: str | None) -> str:
    return f"/v1/models/{model}" if model else "/v1/model"


class _Grpc:
    """What the sync and async gRPC clients share: the channel's settings, request building."""

    _grpc: object  # the grpc module or grpc.aio: both have insecure_channel and secure_channel

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, timeout: float = 60.0,
                 max_message_bytes: int = 64 * 1024 * 1024, *, retry: RetryPolicy | None = None,
                 credentials: grpc.ChannelCredentials | None = None, ca: PathLike | None = None,
                 cert: PathLike | None = None, key: PathLike | None = None, tls: bool = False) -> None:
        """`timeout`: the default deadline of a call, in seconds, over all its attempts. TLS when `credentials`
        (`grpc.ssl_channel_credentials(...)`), `tls` or any of `ca` (the CA that signed the server's certificate;
        default: gRPC's roots), `cert`/`key` (this client's certificate and key, for mTLS) is given."""
        if credentials is None and (tls or ca or cert or key):
            credentials = grpc.ssl_channel_credentials(root_certificates=_read_optional(ca),
                                                       private_key=_read_optional(key),
                                                       certificate_chain=_read_optional(cert))
        from service.proto_gen.rtmdet.v1 import detector_pb2, detector_pb2_grpc

        self._settings = dict(target=target, api_key=api_key, timeout=timeout, max_message_bytes=max_message_bytes,
                              retry=retry, credentials=credentials)
        self.pb = detector_pb2
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        if credentials is None:
            self.channel = self._grpc.insecure_channel(target, options=opts)
        else:
            self.channel = self._grpc.secure_channel(target, credentials, options=opts)
        self.stub = detector_pb2_grpc.DetectorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def request(self, image: ImageInput | np.ndarray, score_threshold: float | None = None,
                max_detections: int | None = None, classes: Sequence[str] | None = None, request_id: str = "",
                rgb: bool = False, model: str | None = None):
        """A DetectRequest: encoded bytes (or a path), or a decoded uint8 array sent as raw pixels."""
        pb = self.pb
        req = pb.DetectRequest(classes=list(classes or ()), request_id=request_id, model=model or "")
        if isinstance(image, np.ndarray):
            arr = np.ascontiguousarray(image, dtype=np.uint8)
            channels = 1 if arr.ndim == 2 else arr.shape[2]
            req.raw.CopyFrom(pb.RawImage(data=arr.tobytes(), height=arr.shape[0], width=arr.shape[1],
                                         channels=channels,
                                         channel_order=pb.CHANNEL_ORDER_RGB if rgb else pb.CHANNEL_ORDER_BGR))
        else:
            req.encoded = _image_bytes(image)
        if score_threshold is not None:
            req.score_threshold = score_threshold
        if max_detections is not None:
            req.max_detections = max_detections
        return req


class GrpcDetectorClient(_Grpc, _SyncClient):
    """`GrpcDetectorClient("127.0.0.1:50051").detect("cat.jpg")` -> dict (or `.detect_pb` for the message)."""

    _grpc = grpc

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None):
        def attempt(left: float):
            try:
                return method(request, timeout=left, metadata=self.metadata)
            except grpc.RpcError as exc:
                raise grpc_error(exc) from exc
        return call_with_retries(self.retry, timeout or self.timeout, "gRPC", attempt)

    def detect_pb(self, image, timeout: float | None = None, **params):
        return self._call(self.stub.Detect, self.request(image, **params), timeout)

    def detect(self, image, timeout: float | None = None, **params) -> dict:
        return response_to_dict(self.detect_pb(image, timeout=timeout, **params))

    def detect_stream(self, frames: Iterable, timeout: float | None = None, **params) -> Iterator[dict]:
        """Video frames over one DetectStream, answered in order (not retried: a stream is not replayable)."""
        requests = (self.request(f, request_id=str(i), **params) for i, f in enumerate(frames))
        try:
            for resp in self.stub.DetectStream(requests, timeout=timeout or self.timeout, metadata=self.metadata):
                yield response_to_dict(resp)
        except grpc.RpcError as exc:
            raise grpc_error(exc) from exc

    def model(self, name: str | None = None, timeout: float | None = None) -> dict:
        return model_info_to_dict(self._call(self.stub.GetModelInfo, self.pb.GetModelInfoRequest(model=name or ""),
                                             timeout))

    def models(self, timeout: float | None = None) -> list[dict]:
        listing = self._call(self.stub.ListModels, self.pb.ListModelsRequest(), timeout)
        return [model_info_to_dict(m) for m in listing.models]

    def _async_twin(self) -> AsyncGrpcDetectorClient:
        return AsyncGrpcDetectorClient(**self._settings)


class AsyncGrpcDetectorClient(_Grpc, _AsyncClient):
    """The grpc.aio client: `await AsyncGrpcDetectorClient(target).detect("cat.jpg")` -> dict. Create it
    inside the event loop that uses it (grpc.aio channels belong to one loop)."""

    _grpc = grpc.aio

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout: float | None):
        async def attempt(left: float):
            try:
                return await method(request, timeout=left, metadata=self.metadata)
            except grpc.RpcError as exc:
                raise grpc_error(exc) from exc
        return await call_with_retries_async(self.retry, timeout or self.timeout, "gRPC", attempt)

    async def detect_pb(self, image, timeout: float | None = None, **params):
        request = await asyncio.to_thread(self.request, image, **params)  # file reads stay off the event loop
        return await self._call(self.stub.Detect, request, timeout)

    async def detect(self, image, timeout: float | None = None, **params) -> dict:
        return response_to_dict(await self.detect_pb(image, timeout=timeout, **params))

    async def model(self, name: str | None = None, timeout: float | None = None) -> dict:
        return model_info_to_dict(await self._call(self.stub.GetModelInfo,
                                                   self.pb.GetModelInfoRequest(model=name or ""), timeout))

    async def models(self, timeout: float | None = None) -> list[dict]:
        listing = await self._call(self.stub.ListModels, self.pb.ListModelsRequest(), timeout)
        return [model_info_to_dict(m) for m in listing.models]

