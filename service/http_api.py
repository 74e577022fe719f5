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
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from model.render import draw_detections
from service.auth import check_bearer
from service.errors import BatchFailed, BodyTimeout, ServiceError
from service.imaging import ImageTooLarge, NotAnImage, check_content_type
from service.metrics import CONTENT_TYPE, RequestRecord
from service.pipeline import DetectionService, DetectOutcome
from service.schemas import (
    DetectQuery,
    DetectResponse,
    ErrorResponse,
    ModelInfo,
    ModelList,
    ReloadRequest,
    Status,
    detect_response,
)
from service.web_ui import web_ui_router

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the image's own bytes
IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
DETECT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}},
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


# -- dependencies ---------------------------------------------------------------------------------------
def get_service(request: Request) -> DetectionService:
    return request.app.state.service


Service = Annotated[DetectionService, Depends(get_service)]


def require_api_key(request: Request, service: Service) -> None:
    check_bearer(request.headers.get("authorization"), service.settings.api_key_value())


def require_admin_key(request: Request, service: Service) -> None:
    """Reload and unload: the admin key when one is set, else the API key (if any)."""
    s = service.settings
    check_bearer(request.headers.get("authorization"), s.admin_key_value() or s.api_key_value(), what="admin key")


def route_to(request: Request, service: DetectionService, name: str | None) -> str:
    slot = service.registry.slot(name)  # 404 naming the known ones when there is none by that name
    request.scope[MODEL_SCOPE_KEY] = slot.name
    return slot.name


def named_model(request: Request, service: Service, name: str) -> str:
    return route_to(request, service, name)


def default_model(request: Request, service: Service) -> str:
    return route_to(request, service, None)


ModelName = Annotated[str, Depends(named_model)]
DefaultModel = Annotated[str, Depends(default_model)]
Query_ = Annotated[DetectQuery, Query()]

router = APIRouter()
detect_routes = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


async def run_detection(request: Request, service: DetectionService, model: str, query: DetectQuery) -> DetectOutcome:
    s = service.settings
    seconds = query.timeout_ms / 1000.0 if query.timeout_ms is not None else s.request_timeout_s
    deadline = time.monotonic() + seconds
    # The upload gets the server's request timeout (not the client's `timeout_ms`, which is about waiting
    # for inference), so a client that trickles its body (slowloris) is cut off and its connection
    # released; it never holds a queue slot (admission comes after the read).
    try:
        data = await asyncio.wait_for(read_image_bytes(request, s.max_upload_bytes), s.request_timeout_s)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {s.request_timeout_s:g} s "
                          "(RTMDET_REQUEST_TIMEOUT_S)") from None
    return await service.detect_encoded(model, data, query, deadline)


async def render(service: DetectionService, out: DetectOutcome) -> Response:
    def encode() -> bytes:
        ok, buf = cv2.imencode(".jpg", draw_detections(out.image, out.detections), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise BatchFailed("could not encode the rendered image")
        return buf.tobytes()

    return Response(await asyncio.get_running_loop().run_in_executor(service.pool, encode), media_type="image/jpeg")


RENDERED = {200: {"content": {"image/jpeg": {}}}}


@detect_routes.post("/detect", response_model=DetectResponse, openapi_extra=DETECT_BODY,
                    summary="Detect objects in one image (the default model)")
async def detect(request: Request, service: Service, model: DefaultModel, query: Query_) -> DetectResponse:
    return detect_response(await run_detection(request, service, model, query))


@detect_routes.post("/detect/render", response_class=Response, responses=RENDERED, openapi_extra=DETECT_BODY,
                    summary="The image back as JPEG with the default model's detections drawn")
async def detect_render(request: Request, service: Service, model: DefaultModel, query: Query_) -> Response:
    return await render(service, await run_detection(request, service, model, query))


@detect_routes.post("/v1/models/{name}/detect", response_model=DetectResponse, openapi_extra=DETECT_BODY,
                    summary="Detect objects in one image with the named model")
async def detect_with(request: Request, service: Service, model: ModelName, query: Query_) -> DetectResponse:
    return detect_response(await run_detection(request, service, model, query))


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


def create_app(service: DetectionService, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app. With `manage_lifecycle` its lifespan loads and warms the models (in the
    background, so /healthz answers at once and /readyz once warm) and stops the workers at exit;
    `service.server` passes False because it owns both protocols' lifecycle."""

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
    install_error_handlers(app)
    app.include_router(web_ui_router(service.settings))
    app.include_router(router)
    app.include_router(detect_routes)
    app.include_router(admin_routes)
    return app
