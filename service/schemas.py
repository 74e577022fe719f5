"""The JSON contract of the HTTP API (pydantic models; they make the OpenAPI schema)."""
from __future__ import annotations

from pydantic import BaseModel, Field

from service.batcher import StageTimes


class Detection(BaseModel):
    box: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in original pixels")
    score: float = Field(..., ge=0.0, le=1.0)
    label: int = Field(..., ge=0, description="class index")
    class_name: str


class ModelSummary(BaseModel):
    name: str
    size: str
    version: str = Field(..., description="first 12 hex digits of the weights' sha256")


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


class ModelInfo(BaseModel):
    name: str
    size: str
    version: str
    classes: list[str]
    input_size: int
    device: str
    dtype: str
    weights_sha256: str | None
    backend: str


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
