"""FastAPI routes: detection (default model and by name), models, health, readiness, metrics.

One `APIRouter`; the service reaches routes through `Depends(get_service)`, query parameters through the
pydantic `DetectQuery`, errors through one handler that reads each `ServiceError`'s HTTP status.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Annotated

import cv2
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from model.render import draw_detections
from service import logs
from service.auth import check_bearer
from service.errors import BatchFailed, BodyTimeout, ServiceError, TooManyImages
from service.imaging import ImageTooLarge, NotAnImage, check_content_type
from service.metrics import CONTENT_TYPE, RequestRecord
from service.pipeline import DetectionService, DetectOutcome
from service.schemas import (
    DetectQuery,
    DetectResponse,
    ErrorResponse,
    ImageError,
    ModelInfo,
    ModelList,
    ReloadRequest,
    Status,
    detect_response,
    image_error,
)
from service.tracing import REQUEST_ID_ATTR, TRACER_NAME, traceparent
from service.web_ui import web_ui_router

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the image's own bytes
IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
DETECT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {"image": {
        "description": "one image, or several `image` parts (answered by a list in the same order)",
        "oneOf": [{"type": "string", "format": "binary"},
                  {"type": "array", "items": {"type": "string", "format": "binary"}}]}}}},
    "image/jpeg": IMAGE_BODY, "image/png": IMAGE_BODY, "image/webp": IMAGE_BODY, "image/bmp": IMAGE_BODY}}}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 500, 503, 504)}
MODEL_SCOPE_KEY = "rtmdet.model"  # the model a request was routed to, for the metrics' `model` label


def is_detect_path(path: str) -> bool:
    return path in ("/detect", "/detect/render") or (path.startswith("/v1/models/")
                                                      and path.endswith(("/detect", "/detect/render")))


class MetricsMiddleware:
    """Counts and times every request by route and status (pure ASGI: no body buffering)."""

    def __init__(self, app, service: DetectionService) -> None:
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        record = RequestRecord(self.metrics, "http", "other", in_flight=is_detect_path(scope["path"]))
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")  # set by FastAPI's routing: the template, so labels stay few
            record.endpoint = getattr(route, "path", "other")
            record.model = scope.get(MODEL_SCOPE_KEY, "")
            record.finish(str(status["code"]))


QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: no access line each (they come every second)


class RequestContextMiddleware:
    """Request ids and access lines: `X-Request-ID` taken from the request (or made), set as the context of
    every log line and span of the request, and echoed in the response with the trace's `traceparent`
    (when tracing is on). One access line per request when it is answered (pure ASGI, like the metrics)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = logs.request_id_from(given)
        status = {"code": 500}
        with logs.request_scope(rid, "http", scope["path"]) as ctx:
            span = trace.get_current_span()  # the instrumentation's server span (invalid when tracing is off)
            if span.is_recording():
                span.set_attribute(REQUEST_ID_ATTR, rid)
            parent = traceparent(span)

            async def send_with_ids(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    headers = list(message.get("headers", []))
                    headers.append((b"x-request-id", rid.encode()))
                    if parent:
                        headers.append((b"traceparent", parent.encode()))
                    message = {**message, "headers": headers}
                await send(message)

            try:
                await self.app(scope, receive, send_with_ids)
            finally:
                route = scope.get("route")
                ctx.route = getattr(route, "path", scope["path"])
                ctx.model = scope.get(MODEL_SCOPE_KEY, ctx.model)
                if scope["path"] not in QUIET_PATHS:
                    logs.access(ctx, status["code"])


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


async def read_images(request: Request, max_bytes: int, max_images: int) -> tuple[list[bytes], bool]:
    """The images of the multipart `image` parts (several allowed), or of a raw image body; and whether
    the request is a several-image one (answered by a list). Each image is held to `max_bytes`; a multipart
    body to `max_images` of them. The per-image size and type checks happen per image later, so one bad
    part fails only its own entry; only a body past the total cap, or too many parts, fails the request."""
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        body = await read_capped_body(request, max_bytes * max_images + MULTIPART_OVERHEAD)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=16 + max_images)
        except HTTPException as exc:
            if "too many files" in str(exc.detail).lower():
                raise TooManyImages(f"more than {max_images} images in one request (RTMDET_MAX_IMAGES_PER_REQUEST)"
                                    ) from None
            raise
        try:
            uploads = [u for u in form.getlist("image") if isinstance(u, UploadFile)]
            if not uploads:
                raise NotAnImage("the multipart form needs a file field named `image`")
            if len(uploads) > max_images:
                raise TooManyImages(f"{len(uploads)} images in one request; the limit is {max_images} "
                                    "(RTMDET_MAX_IMAGES_PER_REQUEST)")
            images = [await u.read() for u in uploads]
        finally:
            await form.close()
        if len(images) == 1 and len(images[0]) > max_bytes:
            raise ImageTooLarge(f"image is {len(images[0])} bytes; the limit is {max_bytes}")
        return images, len(images) > 1
    check_content_type(ctype)
    return [await read_capped_body(request, max_bytes)], False


# -- dependencies ---------------------------------------------------------------------------------------
# All `async def`: FastAPI runs a plain `def` dependency on its thread pool, a hand-off per dependency per
# request (three for /detect). These only read settings and take the registry's short lock, which the request path
# already takes on the loop. (No throughput change was measurable: 1.002x, eager at 320 on 2 cores, the forward
# being ~90% of the server's CPU there.)
async def get_service(request: Request) -> DetectionService:
    return request.app.state.service


Service = Annotated[DetectionService, Depends(get_service)]


async def require_api_key(request: Request, service: Service) -> None:
    check_bearer(request.headers.get("authorization"), service.settings.api_key_value())


async def require_admin_key(request: Request, service: Service) -> None:
    """Reload and unload: the admin key when one is set, else the API key (if any)."""
    s = service.settings
    check_bearer(request.headers.get("authorization"), s.admin_key_value() or s.api_key_value(), what="admin key")


def route_to(request: Request, service: DetectionService, name: str | None) -> str:
    slot = service.registry.slot(name)  # 404 naming the known ones when there is none by that name
    request.scope[MODEL_SCOPE_KEY] = slot.name
    return slot.name


async def named_model(request: Request, service: Service, name: str) -> str:
    return route_to(request, service, name)


async def default_model(request: Request, service: Service) -> str:
    return route_to(request, service, None)


ModelName = Annotated[str, Depends(named_model)]
DefaultModel = Annotated[str, Depends(default_model)]
Query_ = Annotated[DetectQuery, Query()]

router = APIRouter()
detect_routes = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


async def read_upload(request: Request, service: DetectionService,
                      query: DetectQuery) -> tuple[list[bytes], bool, float]:
    """The uploaded images, whether there are several, and the request's deadline."""
    s = service.settings
    seconds = query.timeout_ms / 1000.0 if query.timeout_ms is not None else s.request_timeout_s
    deadline = time.monotonic() + seconds
    # The upload gets the server's request timeout (not the client's `timeout_ms`, which is about waiting
    # for inference), so a client that trickles its body (slowloris) is cut off and its connection
    # released; it never holds a queue slot (admission comes after the read).
    try:
        images, several = await asyncio.wait_for(
            read_images(request, s.max_upload_bytes, s.max_images_per_request), s.request_timeout_s)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {s.request_timeout_s:g} s "
                          "(RTMDET_REQUEST_TIMEOUT_S)") from None
    return images, several, deadline


async def run_detection(request: Request, service: DetectionService, model: str, query: DetectQuery) -> DetectOutcome:
    """One image (the render routes): a several-image form is refused here."""
    images, several, deadline = await read_upload(request, service, query)
    if several:
        raise NotAnImage("this route renders one image; send a single `image` part")
    return await service.detect_encoded(model, images[0], query, deadline, full_size=True)


async def detect_one_or_many(request: Request, service: DetectionService, model: str, query: DetectQuery):
    """One image: its DetectResponse (as before). Several `image` parts: a list in the same order, each
    entry a DetectResponse or, for an image that failed alone, its error."""
    images, several, deadline = await read_upload(request, service, query)
    if not several:
        return detect_response(await service.detect_encoded(model, images[0], query, deadline))
    results = await service.detect_many(model, images, query, deadline)
    return [image_error(r) if isinstance(r, ServiceError) else detect_response(r) for r in results]


async def render(service: DetectionService, out: DetectOutcome) -> Response:
    def encode() -> bytes:
        ok, buf = cv2.imencode(".jpg", draw_detections(out.image, out.detections), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise BatchFailed("could not encode the rendered image")
        return buf.tobytes()

    return Response(await asyncio.get_running_loop().run_in_executor(service.pool, encode), media_type="image/jpeg")


RENDERED = {200: {"content": {"image/jpeg": {}}}}


DetectAnswer = DetectResponse | list[DetectResponse | ImageError]


@detect_routes.post("/detect", response_model=DetectAnswer, openapi_extra=DETECT_BODY,
                    summary="Detect objects in one image, or in several `image` parts (the default model)")
async def detect(request: Request, service: Service, model: DefaultModel, query: Query_) -> DetectAnswer:
    return await detect_one_or_many(request, service, model, query)


@detect_routes.post("/detect/render", response_class=Response, responses=RENDERED, openapi_extra=DETECT_BODY,
                    summary="The image back as JPEG with the default model's detections drawn")
async def detect_render(request: Request, service: Service, model: DefaultModel, query: Query_) -> Response:
    return await render(service, await run_detection(request, service, model, query))


@detect_routes.post("/v1/models/{name}/detect", response_model=DetectAnswer, openapi_extra=DETECT_BODY,
                    summary="Detect objects in one image, or in several `image` parts, with the named model")
async def detect_with(request: Request, service: Service, model: ModelName, query: Query_) -> DetectAnswer:
    return await detect_one_or_many(request, service, model, query)


@detect_routes.post("/v1/models/{name}/detect/render", response_class=Response, responses=RENDERED,
                    openapi_extra=DETECT_BODY, summary="The image back as JPEG with the named model's detections")
async def detect_render_with(request: Request, service: Service, model: ModelName, query: Query_) -> Response:
    return await render(service, await run_detection(request, service, model, query))


@detect_routes.get("/v1/model", response_model=ModelInfo, summary="The default model")
async def default_model_info(service: Service, model: DefaultModel) -> ModelInfo:
    return service.model_info(model)


@detect_routes.get("/v1/models", response_model=ModelList, summary="Every model this server has")
async def list_models(service: Service) -> ModelList:
    return service.model_list()


@detect_routes.get("/v1/models/{name}", response_model=ModelInfo, summary="One model")
async def model_info(service: Service, model: ModelName) -> ModelInfo:
    return service.model_info(model)


@router.get("/v1/models/{name}/ready", response_model=Status, responses={503: {"model": Status}, **ERRORS},
            summary="The named model is loaded, warmed and serving")
async def model_ready(service: Service, model: ModelName):
    if service.is_ready(model):
        return Status(status="ready")
    return JSONResponse({"status": service.not_ready_reason(model)}, status_code=503)


admin_routes = APIRouter(dependencies=[Depends(require_admin_key)], responses={**ERRORS, 422: {"model": ErrorResponse}})


@admin_routes.post("/v1/models/{name}/reload", response_model=ModelInfo,
                   summary="Load a new version beside the current one, check it, then swap it in")
async def reload_model(service: Service, model: ModelName,
                       body: Annotated[ReloadRequest | None, Body()] = None) -> ModelInfo:
    weights = Path(body.weights) if body is not None and body.weights else None
    await asyncio.to_thread(service.registry.reload, model, weights)
    return service.model_info(model)


@admin_routes.post("/v1/models/{name}/unload", response_model=ModelInfo, summary="Stop serving the model")
async def unload_model(service: Service, model: ModelName) -> ModelInfo:
    await asyncio.to_thread(service.registry.unload, model)
    return service.model_info(model)


@router.get("/healthz", response_model=Status, summary="The process is alive")
async def healthz() -> Status:
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}},
            summary="Every model is loaded and warmed, and the service is not shutting down")
async def readyz(service: Service):
    if service.is_ready():
        return Status(status="ready")
    return JSONResponse({"status": service.not_ready_reason()}, status_code=503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}},
            summary="Prometheus metrics (both protocols)")
async def metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)


def install_error_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status, headers=exc.headers or None)

    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody will read an answer; 499 (nginx's "client closed request") only labels it in the metrics,
        # instead of a traceback per disconnect in the log.
        return JSONResponse({"detail": "client disconnected"}, status_code=499)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ClientDisconnect, client_gone)


def create_app(service: DetectionService, manage_lifecycle: bool = True, tracer_provider=None) -> FastAPI:
    """The FastAPI app. With `manage_lifecycle` its lifespan loads and warms the models (in the
    background, so /healthz answers at once and /readyz once warm) and stops the workers at exit;
    `service.server` passes False because it owns both protocols' lifecycle. With a `tracer_provider`
    (service.tracing) requests are traced; without one nothing is instrumented."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_lifecycle:
            service.start()
        yield
        if manage_lifecycle:
            service.shutdown()

    app = FastAPI(title="rtmdet-serve", version="1", lifespan=lifespan,
                  description="RTMDet object detection: several models, each behind its own dynamic batcher "
                              "(HTTP and gRPC).")
    app.state.service = service
    if service.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=service.settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    app.include_router(web_ui_router(service.settings))
    app.include_router(router)
    app.include_router(detect_routes)
    app.include_router(admin_routes)
    if tracer_provider is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        service.tracer = tracer_provider.get_tracer(TRACER_NAME)
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls=",".join(QUIET_PATHS),
                                           exclude_spans=["receive", "send"])
    return app


def create_health_app(service: DetectionService) -> FastAPI:
    """The plain-text side port (RTMDET_HEALTH_PORT): liveness, readiness and metrics only."""
    app = FastAPI(title="rtmdet-serve health", version="1", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)
    app.include_router(router)
    return app
