"""The JSON contract (pydantic models; they make the OpenAPI schema). gRPC messages are built from the same
objects (`service.grpc_api`), and `rtmdet client` prints them, so the three never drift apart."""
from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from service.batcher import StageTimes


class Detection(BaseModel):
    box: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in original pixels")
    score: float = Field(..., ge=0.0, le=1.0)
    label: int = Field(..., ge=0, description="class index")
    class_name: str


class ModelSummary(BaseModel):
    name: str = Field(..., description="the network, e.g. rtmdet-tiny")
    size: str
    version: str = Field(..., description="the version that answered: its repository folder, else the first 12 "
                                          "hex digits of the weights' sha256")
    model: str = Field("", description="the served model's name (as in /v1/models/{name})")


class Timing(BaseModel):
    """Milliseconds per stage. Inference and post-processing are those of the whole batch."""

    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float
    batch_size: int


class DetectResponse(BaseModel):
    width: int
    height: int
    model: ModelSummary
    detections: list[Detection]
    timing: Timing


class ImageErrorDetail(BaseModel):
    status: int = Field(..., description="the HTTP status this image alone would have got")
    code: str = Field(..., description="the gRPC status name, e.g. INVALID_ARGUMENT")
    detail: str


class ImageError(BaseModel):
    """The place of an image that failed, in the list a several-image POST /detect answers."""

    error: ImageErrorDetail


class DetectQuery(BaseModel):
    """Query parameters of the detect routes (validated once, here)."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float | None = Field(None, ge=0.0, le=1.0, description="keep detections scoring above this")
    max_detections: int | None = Field(None, ge=1, description="at most this many detections, best first")
    classes: list[str] | None = Field(None, description="class names to keep (repeat, or comma-separate)")
    timeout_ms: float | None = Field(None, gt=0, le=86_400_000,
                                     description="deadline for this request; default RTMDET_REQUEST_TIMEOUT_S")


class ModelInfo(BaseModel):
    """One served model (its current version): what GET /v1/models lists and gRPC GetModelInfo returns."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(..., description="the name requests use")
    name: str = Field(..., description="the network, e.g. rtmdet-tiny")
    size: str
    version: str
    classes: list[str]
    input_size: int
    device: str
    dtype: str
    weights_sha256: str | None
    backend: str
    state: str = Field(..., description="ready, loading, failed or unloaded")
    default: bool = False
    weights: str = ""
    error: str | None = None
    runner: str = Field("", description="what runs the network: eager, inductor, onnxruntime, openvino, cudagraph, "
                                        "a+b (auto: each batch size on its winner), or the backend (onnx, triton)")
    runner_choice: str | None = Field(None, description="with accelerate=auto: every candidate's measured times and "
                                                        "the winners, or where a reused measurement came from")
    sparse_regression: bool = Field(False, description="the head's box branch runs at the candidate points only, "
                                                       "after the rest of the network (RTMDET_SPARSE_REGRESSION)")
    canvas: str = Field("square", description="the letterbox's canvas: square (input_size x input_size) or tight "
                                              "(padded only to a multiple of 32; RTMDET_CANVAS)")


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class ReloadRequest(BaseModel):
    weights: str | None = Field(None, description="a weights file on the server; default: the model's current one")


class Status(BaseModel):
    status: str


class ErrorResponse(BaseModel):
    detail: str


def timing_from(times: StageTimes, total_s: float) -> Timing:
    ms = 1000.0
    return Timing(decode_ms=round(times.decode * ms, 3), preprocess_ms=round(times.preprocess * ms, 3),
                  queue_ms=round(times.queue_wait * ms, 3), inference_ms=round(times.inference * ms, 3),
                  postprocess_ms=round(times.postprocess * ms, 3), total_ms=round(total_s * ms, 3),
                  batch_size=times.batch_size)


def detections_from(dets) -> list[Detection]:
    """Same rounding as `Detections.to_list()` (what `rtmdet detect` prints)."""
    return [Detection(**d) for d in dets.to_list()]


def image_error(exc) -> ImageError:
    """A `service.errors.ServiceError` as one entry of a several-image answer."""
    return ImageError(error=ImageErrorDetail(status=exc.http_status, code=exc.grpc_code, detail=str(exc)))


def detect_response(out) -> DetectResponse:
    """A `service.pipeline.DetectOutcome` as the JSON contract."""
    return DetectResponse(width=out.width, height=out.height,
                          model=ModelSummary(name=out.network, size=out.size, version=out.version, model=out.model),
                          detections=detections_from(out.detections),
                          timing=timing_from(out.times, time.perf_counter() - out.started))
