"""FastAPI routes: POST /detect, POST /detect/render, health, readiness, metrics, model info."""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import cv2
from fastapi import Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from model.render import draw_detections
from service.batcher import BatchFailed, DeadlineExceeded, NotAccepting, QueueFull
from service.imaging import ImageError, ImageTooLarge, NotAnImage, check_content_type
from service.metrics import CONTENT_TYPE
from service.pipeline import DetectionService, DetectOutcome, InvalidRequest
from service.schemas import DetectResponse, ErrorResponse, ModelInfo, ModelSummary, Status, detections_from, timing_from
from service.web_ui import web_ui_router

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the image's own bytes
DETECT_ENDPOINTS = ("/detect", "/detect/render")
KNOWN_ENDPOINTS = frozenset({*DETECT_ENDPOINTS, "/healthz", "/readyz", "/metrics", "/v1/model"})
IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
DETECT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}},
    "image/jpeg": IMAGE_BODY, "image/png": IMAGE_BODY, "image/webp": IMAGE_BODY, "image/bmp": IMAGE_BODY}}}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 500, 503, 504)}


class Unauthorized(Exception):
    pass


class BodyTimeout(Exception):
    """The request body did not arrive before the request's deadline (a slow or stalled upload)."""


class MetricsMiddleware:
    """Counts and times every request by endpoint and status (pure ASGI: no body buffering)."""

    def __init__(self, app, service: DetectionService) -> None:
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        counted = endpoint in DETECT_ENDPOINTS
        if counted:
            self.metrics.in_flight.labels(protocol="http").inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if counted:
                self.metrics.in_flight.labels(protocol="http").dec()
            self.metrics.request_latency.labels(protocol="http", endpoint=endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(protocol="http", endpoint=endpoint, status=str(status["code"])).inc()


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, without reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ImageTooLarge(f"request body passed the limit of {limit} bytes")
    return bytes(body)


async def read_image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image of a multipart `image` field or of a raw image body."""
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        body = await read_capped_body(request, max_bytes + MULTIPART_OVERHEAD)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise NotAnImage("the multipart form needs a file field named `image`")
            data = await upload.read()
        finally:
            await form.close()
        if len(data) > max_bytes:
            raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
        return data
    check_content_type(ctype)
    return await read_capped_body(request, max_bytes)


def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    handlers = {
        ImageError: lambda e: error(e.http_status, str(e)),
        InvalidRequest: lambda e: error(400, str(e)),
        QueueFull: lambda e: error(503, str(e), {"Retry-After": "1"}),
        NotAccepting: lambda e: error(503, str(e), {"Retry-After": "1"}),
        DeadlineExceeded: lambda e: error(504, str(e)),
        BatchFailed: lambda e: error(500, str(e)),
        Unauthorized: lambda e: error(401, str(e), {"WWW-Authenticate": "Bearer"}),
        BodyTimeout: lambda e: error(408, str(e), {"Connection": "close"}),
        # The client went away mid-upload: nobody will read an answer; 499 (nginx's "client closed request")
        # only labels it in the metrics, instead of a traceback per disconnect in the log.
        ClientDisconnect: lambda e: error(499, "client disconnected"),
    }
    for exc_type, make in handlers.items():
        app.add_exception_handler(exc_type, lambda request, exc, make=make: make(exc))


def create_app(service: DetectionService, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app. With `manage_lifecycle` its lifespan loads and warms the model (in the
    background, so /healthz answers at once and /readyz once warm) and stops the worker at exit;
    `service.server` passes False because it owns both protocols' lifecycle."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_lifecycle:
            service.start()
        yield
        if manage_lifecycle:
            service.shutdown()

    settings = service.settings
    app = FastAPI(title="rtmdet-serve", version="1", lifespan=lifespan,
                  description="RTMDet object detection over one dynamic batcher (HTTP and gRPC).")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, service=service)
    install_error_handlers(app)
    app.include_router(web_ui_router(settings))
    api_key = settings.api_key_value()

    async def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key; send `Authorization: Bearer <key>`")

    def deadline_from(timeout_ms: float | None) -> float:
        seconds = timeout_ms / 1000.0 if timeout_ms is not None else settings.request_timeout_s
        return time.monotonic() + seconds

    async def run_detection(request: Request, score_threshold, max_detections, classes, timeout_ms) -> DetectOutcome:
        deadline = deadline_from(timeout_ms)
        params = service.params(score_threshold, max_detections, classes)
        # The upload gets the server's request timeout (not the client's `timeout_ms`, which is about waiting
        # for inference), so a client that trickles its body (slowloris) is cut off and its connection
        # released; it never holds a queue slot (admission comes after the read).
        try:
            data = await asyncio.wait_for(read_image_bytes(request, settings.max_upload_bytes),
                                          settings.request_timeout_s)
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {settings.request_timeout_s:g} s "
                              "(RTMDET_REQUEST_TIMEOUT_S)") from None
        return await service.detect_encoded(data, params, deadline)

    detect_query = dict(
        score_threshold=Query(None, ge=0.0, le=1.0, description="keep detections scoring above this"),
        max_detections=Query(None, ge=1, description="at most this many detections, best first"),
        classes=Query(None, description="class names to keep (repeat, or comma-separate)"),
        timeout_ms=Query(None, gt=0, le=86_400_000,
                         description="deadline for this request; default RTMDET_REQUEST_TIMEOUT_S"),
    )

    @app.post("/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=DETECT_BODY,
              dependencies=[Depends(require_api_key)], summary="Detect objects in one image")
    async def detect(request: Request, score_threshold: float | None = detect_query["score_threshold"],
                     max_detections: int | None = detect_query["max_detections"],
                     classes: list[str] | None = detect_query["classes"],
                     timeout_ms: float | None = detect_query["timeout_ms"]) -> DetectResponse:
        out = await run_detection(request, score_threshold, max_detections, classes, timeout_ms)
        info = service.describe()
        return DetectResponse(width=out.width, height=out.height,
                              model=ModelSummary(name=info["name"], size=info["size"], version=info["version"]),
                              detections=detections_from(out.detections),
                              timing=timing_from(out.times, time.perf_counter() - out.started))

    @app.post("/detect/render", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
              openapi_extra=DETECT_BODY, dependencies=[Depends(require_api_key)],
              summary="The image back as JPEG with the detections drawn")
    async def detect_render(request: Request, score_threshold: float | None = detect_query["score_threshold"],
                            max_detections: int | None = detect_query["max_detections"],
                            classes: list[str] | None = detect_query["classes"],
                            timeout_ms: float | None = detect_query["timeout_ms"]) -> Response:
        out = await run_detection(request, score_threshold, max_detections, classes, timeout_ms)

        def encode() -> bytes:
            ok, buf = cv2.imencode(".jpg", draw_detections(out.image, out.detections), [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise BatchFailed("could not encode the rendered image")
            return buf.tobytes()

        jpeg = await asyncio.get_running_loop().run_in_executor(service.pool, encode)
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/healthz", response_model=Status, summary="The process is alive")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}},
             summary="The model is loaded and warmed, and the service is not shutting down")
    async def readyz():
        if service.is_ready():
            return Status(status="ready")
        return JSONResponse({"status": service.not_ready_reason()}, status_code=503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}},
             summary="Prometheus metrics (both protocols)")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS, dependencies=[Depends(require_api_key)],
             summary="The model being served")
    async def model_info() -> ModelInfo:
        return ModelInfo(**service.describe())

    return app
