"""Service configuration: one typed object, read from `RTMDET_*` environment variables.

Command-line flags of `rtmdet serve` override the environment (see `service.server.settings_from_args`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import SIZES
from service.faults import FaultInjection

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "rtmdet_tiny_shapes.pth"
BACKENDS = ("torch", "onnx", "triton")


class ServiceSettings(BaseSettings):
    """Everything an operator can set. Environment: `RTMDET_<FIELD>` (e.g. `RTMDET_MAX_BATCH_SIZE=16`)."""

    model_config = SettingsConfigDict(env_prefix="RTMDET_", extra="ignore", protected_namespaces=())

    # The model.
    backend: str = "torch"
    weights: Path = DEFAULT_WEIGHTS  # a checkpoint file, or a zoo name (rtmdet-tiny ... rtmdet-x)
    weights_key: Literal["ema", "raw"] = "ema"  # which weights of a training checkpoint (model.checkpoint)
    size: str = "tiny"  # unset with a zoo name: that name's size
    device: str = "auto"
    fp16: bool = False
    # None: the checkpoint's training size (meta `img_size`), else 640.
    input_size: int | None = Field(None, ge=32, le=4096)
    class_names: list[str] | None = None  # override the checkpoint's class names

    # Defaults for requests that do not say.
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    max_detections_limit: int = Field(1000, ge=1)  # the most a request may ask for

    # Dynamic batching.
    max_batch_size: int = Field(8, ge=1, le=256)
    max_queue_delay_ms: float = Field(2.0, ge=0.0)
    max_queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(30.0, gt=0.0)  # HTTP deadline unless the request sets `timeout_ms`
    header_timeout_s: float = Field(10.0, gt=0.0)  # for an HTTP request line + headers, from connect or last reply
    # Watchdog: a model step (forward + post-processing of one batch) running longer than this fails its
    # requests (500/INTERNAL) and the batcher carries on in a fresh thread; 0 turns it off.
    inference_timeout_s: float = Field(60.0, ge=0.0)
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    warmup: bool = True

    # Network.
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    shutdown_grace_s: float = Field(30.0, ge=0.0)

    # Input limits and access.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)  # empty: CORS off
    web_ui: bool = True  # GET / serves the page to try the detector in a browser (service/web_ui.py)

    # Tests only: make the model step fail on purpose (see service/faults.py). Never set in production.
    fault_injection: FaultInjection | None = None

    @field_validator("size")
    @classmethod
    def _known_size(cls, v: str) -> str:
        if v not in SIZES:
            raise ValueError(f"unknown size {v!r}; choose one of {', '.join(SIZES)}")
        return v

    @model_validator(mode="after")
    def _size_of_zoo_name(self) -> ServiceSettings:
        from model.zoo import zoo_size

        if "size" not in self.model_fields_set and zoo_size(self.weights):
            self.size = zoo_size(self.weights)
        return self

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; choose one of {', '.join(BACKENDS)}")
        return v

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None
