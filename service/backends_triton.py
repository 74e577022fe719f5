"""RTMDET_BACKEND=triton: the network on NVIDIA Triton Inference Server, over gRPC (`tritonclient`).

The service keeps image decoding, letterboxing, NMS, the API and the metrics; Triton runs only the
exported network (`rtmdet export --format triton`), batching across service replicas if it likes.
Readiness follows Triton's model readiness, polled in the background so that `/readyz` and the
per-request readiness check never wait on the network: when Triton goes away the service turns
unready within `RTMDET_TRITON_HEALTH_INTERVAL_S`, and requests are refused at once with 503 instead of
hanging. A failed inference call marks it unready immediately; the poller marks it ready again.
Settings: `RTMDET_TRITON_URL` (host:port of Triton's gRPC endpoint), `RTMDET_TRITON_MODEL`, and the
timeouts below.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import TestConfig
from service.backends_external import ExternalNetworkBackend, NetworkInfo

log = logging.getLogger("rtmdet.triton")


class TritonSettings(BaseSettings):
    """`RTMDET_TRITON_*`: where the model lives and how long to wait for it."""

    model_config = SettingsConfigDict(env_prefix="RTMDET_TRITON_", extra="ignore", protected_namespaces=())

    url: str = "127.0.0.1:8001"
    model: str = "rtmdet"
    model_version: str = ""
    timeout_s: float = Field(10.0, gt=0)  # one inference call; a hung Triton fails the batch after this
    health_interval_s: float = Field(1.0, gt=0)  # how often model readiness is polled
    health_timeout_s: float = Field(1.0, gt=0)
    startup_timeout_s: float = Field(120.0, ge=0)  # how long start-up waits for the model to be ready


class TritonBackend(ExternalNetworkBackend):
    name = "triton"

    def __init__(self, settings: TritonSettings, test_config: TestConfig | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        import tritonclient.grpc as triton_grpc

        from service.backends import BackendUnavailable

        self._grpc = triton_grpc
        self.settings = settings
        self.client = triton_grpc.InferenceServerClient(settings.url)
        self._health_client = triton_grpc.InferenceServerClient(settings.url)
        if not self._wait_until_ready(settings.startup_timeout_s):
            raise BackendUnavailable(f"Triton at {settings.url}: model {settings.model!r} not ready after "
                                     f"{settings.startup_timeout_s:.0f} s")
        config = self.client.get_model_config(settings.model, settings.model_version, as_json=True,
                                              client_timeout=settings.timeout_s)["config"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("rtmdet.layout", "heads") != "heads":
            raise BackendUnavailable(f"Triton model {settings.model!r} has layout {params['rtmdet.layout']!r}; "
                                     "serve a heads export (rtmdet export --format triton, without --decode)")
        (inp,) = config["input"]
        self.input_name = inp["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.max_batch_size = int(config.get("max_batch_size", 0)) or None
        cfg = test_config or TestConfig.serving()
        size = int(inp["dims"][0])
        if size != cfg.input_size:
            cfg = replace(cfg, input_size=size)
        info = NetworkInfo.from_metadata(params, size, class_names)
        super().__init__(info, cfg, device_label=f"triton:{settings.url}/{settings.model}")
        self._remote_ready = True
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_health, name="rtmdet-triton-health", daemon=True)
        self._poller.start()

    @classmethod
    def from_settings(cls, settings) -> TritonBackend:
        from service.backends import BackendUnavailable

        cfg = TestConfig.serving(score_thr=settings.score_threshold, input_size=settings.input_size or 640,
                                 max_per_img=settings.max_detections_limit)
        try:
            return cls(TritonSettings(), cfg, settings.class_names)
        except BackendUnavailable:
            raise
        except Exception as exc:  # tritonclient's InferenceServerException, bad config, ...
            raise BackendUnavailable(f"Triton backend: {type(exc).__name__}: {exc}") from None

    # -- readiness ------------------------------------------------------------------------------------
    def _model_ready(self) -> bool:
        try:
            return bool(self._health_client.is_model_ready(self.settings.model, self.settings.model_version,
                                                           client_timeout=self.settings.health_timeout_s))
        except Exception:  # unreachable, timed out, shutting down: all mean "not ready"
            return False

    def _wait_until_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._model_ready():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def _poll_health(self) -> None:
        while not self._stop.wait(self.settings.health_interval_s):
            ready = self._model_ready()
            if ready != self._remote_ready:
                log.warning("Triton model %s at %s is %s", self.settings.model, self.settings.url,
                            "ready again" if ready else "NOT ready")
            self._remote_ready = ready

    def is_ready(self) -> bool:
        return super().is_ready() and self._remote_ready

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=self.settings.health_interval_s + self.settings.health_timeout_s + 1)
        self.client.close()
        self._health_client.close()

    # -- the network ----------------------------------------------------------------------------------
    def forward(self, batch: torch.Tensor):
        data = batch.numpy()
        step = self.max_batch_size or data.shape[0]
        parts = [self._infer(data[i:i + step]) for i in range(0, data.shape[0], step)]
        outs = {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}
        strides = self.info.strides
        return ([torch.from_numpy(outs[f"cls_s{s}"]) for s in strides],
                [torch.from_numpy(outs[f"reg_s{s}"]) for s in strides])

    def _infer(self, data: np.ndarray) -> dict[str, np.ndarray]:
        g = self._grpc
        inp = g.InferInput(self.input_name, list(data.shape), "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(data))
        outputs = [g.InferRequestedOutput(n) for n in self.output_names]
        try:
            result = self.client.infer(self.settings.model, [inp], self.settings.model_version, outputs=outputs,
                                       client_timeout=self.settings.timeout_s)
        except Exception:
            self._remote_ready = False  # refuse new requests at once; the poller decides when it is back
            raise
        return {n: result.as_numpy(n) for n in self.output_names}
