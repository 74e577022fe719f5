"""Service configuration: one typed object, read from `RTMDET_*` environment variables.

Command-line flags of `rtmdet serve` override the environment (see `service.server.settings_from_args`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.config import SIZES, Canvas
from service.faults import FaultInjection

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "rtmdet_tiny_shapes.pth"
BACKENDS = ("torch", "onnx", "triton")
ACCELERATE_FIELD = Field(None, pattern=r"^(auto|eager|inductor|onnxruntime|openvino|torchscript|onednn|cudagraph"
                                       r"|openvino-bf16|openvino-int8)$")


AUTO_CANDIDATES = ("eager", "inductor", "onnxruntime", "openvino")  # model.inference.runner_choice.CANDIDATES


def parse_auto_candidates(v: object) -> tuple[str, ...] | None:
    """`auto`'s field: a list, or one string of names joined by `,` or `+` (`RTMDET_AUTO_CANDIDATES=eager,openvino`;
    `--model ...,auto_candidates=eager+openvino`, where commas separate options). Eager is always measured: it is
    the reference every other candidate is checked against."""
    if v is None:
        return None
    names = v.replace("+", ",").split(",") if isinstance(v, str) else list(v)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in AUTO_CANDIDATES]
    if unknown or not names:
        raise ValueError(f"auto candidates {unknown or names!r}: choose from {', '.join(AUTO_CANDIDATES)}")
    return tuple(dict.fromkeys(["eager", *names]))


AutoCandidates = Annotated[tuple[str, ...] | None, NoDecode]


def choices_file(v: object) -> object:
    """An empty `RTMDET_AUTO_CHOICES_FILE=` is unset (not the current folder); a folder is refused at start-up."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if Path(v).is_dir():
        raise ValueError(f"{v} is a folder: name a file in it (e.g. {Path(v) / 'auto-choices.json'})")
    return v


def known_size(v: str) -> str:
    if v not in SIZES:
        raise ValueError(f"unknown size {v!r}; choose one of {', '.join(SIZES)}")
    return v


def known_backend(v: str) -> str:
    if v not in BACKENDS:
        raise ValueError(f"unknown backend {v!r}; choose one of {', '.join(BACKENDS)}")
    return v


class TritonSettings(BaseModel):
    """Where a Triton-served model lives and how long to wait for it (`RTMDET_TRITON_*`)."""

    model_config = ConfigDict(protected_namespaces=())

    url: str = "127.0.0.1:8001"
    model: str = "rtmdet"
    model_version: str = ""
    timeout_s: float = Field(10.0, gt=0)  # one inference call; a hung Triton fails the batch after this
    health_interval_s: float = Field(1.0, gt=0)  # how often model readiness is polled
    health_timeout_s: float = Field(1.0, gt=0)
    startup_timeout_s: float = Field(120.0, ge=0)  # how long start-up waits for the model to be ready


class ModelSpec(BaseModel):
    """One model to serve: what `--model NAME=PATH,...` or a repository version folder says."""

    model_config = ConfigDict(protected_namespaces=(), frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    weights: Path
    size: str = "tiny"
    backend: str = "torch"
    input_size: int | None = Field(None, ge=32, le=4096)  # None: the checkpoint's training size, else 640
    device: str = "auto"
    fp16: bool = False
    # The torch runner's mode (model.inference.accelerate): None is the device's default (eager on the CPU, CUDA
    # graphs on CUDA); `auto` measures eager, inductor, ONNX Runtime and OpenVINO here at start-up and keeps the
    # fastest. `torchscript` (deprecated, opt-in) keeps ~40-110 MB per traced copy for the life of the process:
    # not for a model that is reloaded often.
    accelerate: str | None = ACCELERATE_FIELD
    # `openvino-int8`'s calibration images: a folder of real images like those served (model.inference.low_precision).
    calibration: Path | None = None
    # `auto`'s field (None: all of AUTO_CANDIDATES) and the file that keeps its measurements across restarts
    # (model.inference.choice_store; None: measured at every start).
    auto_candidates: AutoCandidates = None
    auto_choices_file: Path | None = None
    weights_key: Literal["ema", "raw"] = "ema"  # which weights of a training checkpoint (model.checkpoint)
    class_names: list[str] | None = None
    num_classes: int | None = Field(None, ge=1)  # pinned: a file with another class count is refused
    version: str | None = None  # the repository's version folder; None: from the weights' hash
    latency_slo_ms: float | None = Field(None, gt=0.0)  # None: the service's RTMDET_LATENCY_SLO_MS
    # The box branch at the candidates only (model.inference.sparse_regression): CPU, float32 runners.
    sparse_regression: bool = True
    # square: every image padded to input_size x input_size (the official pipeline); tight: only up to a multiple of
    # 32, so a 4:3 photo runs at 640 x 480 (model.inference.preprocess). Not for a static-shape export.
    canvas: Canvas = "square"
    triton: TritonSettings = Field(default_factory=TritonSettings)

    _known_size = field_validator("size")(known_size)
    _known_backend = field_validator("backend")(known_backend)
    _auto_candidates = field_validator("auto_candidates", mode="before")(parse_auto_candidates)
    _choices_file = field_validator("auto_choices_file", mode="before")(choices_file)


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
    accelerate: str | None = ACCELERATE_FIELD  # see ModelSpec.accelerate
    calibration: Path | None = None  # see ModelSpec.calibration
    auto_candidates: AutoCandidates = None  # see ModelSpec.auto_candidates
    auto_choices_file: Path | None = None  # see ModelSpec.auto_choices_file
    # On the CPU, the head's box branch runs at the points that pass the score threshold only, after the rest of
    # the network (model.inference.sparse_regression): the same boxes for less work. false: the dense head.
    sparse_regression: bool = True
    canvas: Canvas = "square"  # see ModelSpec.canvas
    # None: the checkpoint's training size (meta `img_size`), else 640.
    input_size: int | None = Field(None, ge=32, le=4096)
    class_names: list[str] | None = None  # override the checkpoint's class names
    model_name: str = "default"  # the shipped/RTMDET_WEIGHTS model's name when no --model is given
    models: list[ModelSpec] = Field(default_factory=list)  # --model NAME=PATH,... (the first is the default)
    model_repository: Path | None = None  # one folder per model, one sub-folder per version
    repository_poll_s: float = Field(0.0, ge=0.0)  # re-read the repository this often; 0: only on SIGHUP
    admin_key: SecretStr | None = None  # reload/unload need `Authorization: Bearer <admin key>` when set
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "rtmdet"
    triton_model_version: str = ""
    triton_timeout_s: float = Field(10.0, gt=0)
    triton_health_interval_s: float = Field(1.0, gt=0)
    triton_health_timeout_s: float = Field(1.0, gt=0)
    triton_startup_timeout_s: float = Field(120.0, ge=0)

    # Defaults for requests that do not say.
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    max_detections_limit: int = Field(1000, ge=1)  # the most a request may ask for

    # Dynamic batching.
    max_batch_size: int = Field(8, ge=1, le=256)
    max_queue_delay_ms: float = Field(2.0, ge=0.0)
    max_queue_size: int = Field(64, ge=1)
    # Batch to a latency SLO (ms, per model; a model's own `latency_slo_ms` overrides it): requests that the
    # learned batch times say would be answered later are refused at admission (503 / RESOURCE_EXHAUSTED with
    # Retry-After). None: off, the fixed `max_queue_delay_ms` batcher.
    latency_slo_ms: float | None = Field(None, gt=0.0)
    # Batches one model runs at once: a second starts while one runs once a full batch is queued, where the runner
    # takes overlapping calls (the CPU's torch streams) and no SLO is set (service.batcher); 1: one at a time.
    max_batches_in_flight: int = Field(2, ge=1, le=4)
    request_timeout_s: float = Field(30.0, gt=0.0)  # HTTP deadline unless the request sets `timeout_ms`
    header_timeout_s: float = Field(10.0, gt=0.0)  # for an HTTP request line + headers, from connect or last reply
    # Watchdog: a model step (forward + post-processing of one batch) running longer than this fails its
    # requests (500/INTERNAL) and the batcher carries on in a fresh thread; 0 turns it off.
    inference_timeout_s: float = Field(60.0, ge=0.0)
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # Threads (see service/serve_env.py; RTMDET_OMP_WAIT_POLICY, default PASSIVE, is read before torch loads).
    torch_threads: int = Field(0, ge=0)  # torch intra-op threads; 0: one per core
    opencv_threads: int = Field(1, ge=0)  # OpenCV's own pool per call (decoding is already one image a thread)
    # glibc keeps freed blocks for the next forward, one arena, no mmap (model.inference.allocator): faster
    # forwards (fewer page faults), at the price of holding the peak working set. false: glibc's defaults.
    keep_freed_memory: bool = True
    # `rtmdet serve` freezes the objects alive before the models load (imports, the apps), so the garbage
    # collector's full passes stop walking them (service/heap.py). false: CPython's defaults.
    freeze_heap: bool = True
    warmup: bool = True

    # Network.
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    shutdown_grace_s: float = Field(30.0, ge=0.0)
    # TLS (service/tls.py): with a cert and key both protocols speak TLS only; with a client CA they also
    # demand a client certificate signed by it (mTLS). `health_port` adds a plain-text HTTP listener that
    # serves only /healthz, /readyz and /metrics (for probes and scrapers without client certificates).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    health_port: int | None = Field(None, ge=0, le=65535)

    # Logs (service/logs.py): one JSON object a line, or text.
    log_format: Literal["text", "json"] = "text"

    # Input limits and access.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # A JPEG at least twice the network's input on both sides is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
    # scaled IDCT, never below the letterboxed size), boxes still in the original's pixels; false: full decode.
    reduced_decode: bool = True
    max_images_per_request: int = Field(16, ge=1, le=256)  # images in one multipart POST or DetectBatch
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)  # empty: CORS off
    web_ui: bool = True  # GET / serves the page to try the detector in a browser (service/web_ui.py)

    # Tests only: make the model step fail on purpose (see service/faults.py). Never set in production.
    fault_injection: FaultInjection | None = None

    _known_size = field_validator("size")(known_size)
    _known_backend = field_validator("backend")(known_backend)
    _auto_candidates = field_validator("auto_candidates", mode="before")(parse_auto_candidates)
    _choices_file = field_validator("auto_choices_file", mode="before")(choices_file)

    @model_validator(mode="after")
    def _size_of_zoo_name(self) -> ServiceSettings:
        from model.zoo import zoo_size

        if "size" not in self.model_fields_set and zoo_size(self.weights):
            self.size = zoo_size(self.weights)
        return self

    @field_validator("api_key", "admin_key")
    @classmethod
    def _empty_key_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def admin_key_value(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key is not None else None

    def triton_settings(self) -> TritonSettings:
        return TritonSettings(url=self.triton_url, model=self.triton_model, model_version=self.triton_model_version,
                              timeout_s=self.triton_timeout_s, health_interval_s=self.triton_health_interval_s,
                              health_timeout_s=self.triton_health_timeout_s,
                              startup_timeout_s=self.triton_startup_timeout_s)

    def model_defaults(self) -> dict:
        """What every model spec takes from the service's settings unless it says otherwise (`--model` options,
        a repository version's config)."""
        return {"device": self.device, "fp16": self.fp16, "backend": self.backend, "size": self.size,
                "accelerate": self.accelerate, "calibration": self.calibration,
                "auto_candidates": self.auto_candidates, "auto_choices_file": self.auto_choices_file,
                "sparse_regression": self.sparse_regression, "canvas": self.canvas,
                "triton": self.triton_settings()}

    def default_spec(self) -> ModelSpec:
        """The model served when neither --model nor a repository is given (RTMDET_WEIGHTS, the shipped one)."""
        return ModelSpec(**self.model_defaults(), name=self.model_name, weights=self.weights,
                         input_size=self.input_size, weights_key=self.weights_key, class_names=self.class_names)
