"""RTMDET_BACKEND=triton: the network on NVIDIA Triton Inference Server, over gRPC (`tritonclient`).

The service keeps image decoding, letterboxing, NMS, the API and the metrics; Triton runs only the
exported network (`rtmdet export --format triton`), batching across service replicas if it likes.
Readiness follows Triton's model readiness, polled in the background so that `/readyz` and the
per-request readiness check never wait on the network: when Triton goes away the service turns
unready within `RTMDET_TRITON_HEALTH_INTERVAL_S`, and requests are refused at once with 503 instead of
hanging. A failed inference call marks it unready immediately; the poller marks it ready again.
Settings: `RTMDET_TRITON_URL` (host:port of Triton's gRPC endpoint), `RTMDET_TRITON_MODEL`, and the
timeouts in `service.settings.TritonSettings`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from model.inference.runner import HeadOutputs, blank_batch
from service.backends.exported import head_outputs, network_info
from service.errors import BackendUnavailable
from service.settings import ModelSpec, TritonSettings

log = logging.getLogger("rtmdet.triton")


class TritonRunner:
    device = torch.device("cpu")

    def __init__(self, settings: TritonSettings, class_names: Sequence[str] | None = None) -> None:
        import tritonclient.grpc as triton_grpc

        self._grpc = triton_grpc
        self.settings = settings
        self.client = triton_grpc.InferenceServerClient(settings.url)
        self._health_client = triton_grpc.InferenceServerClient(settings.url)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if not self._wait_until_ready(settings.startup_timeout_s):
            self._close_clients()
            raise BackendUnavailable(f"Triton at {settings.url}: model {settings.model!r} not ready after "
                                     f"{settings.startup_timeout_s:.0f} s")
        config = self.client.get_model_config(settings.model, settings.model_version, as_json=True,
                                              client_timeout=settings.timeout_s)["config"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("rtmdet.layout", "heads") != "heads":
            self._close_clients()
            raise BackendUnavailable(f"Triton model {settings.model!r} has layout {params['rtmdet.layout']!r}; "
                                     "serve a heads export (rtmdet export --format triton, without --decode)")
        (inp,) = config["input"]
        self.input_name = inp["name"]
        self.output_names = [o["name"] for o in config["output"]]
        self.max_batch_size = int(config.get("max_batch_size", 0)) or None
        self.info = network_info(params, "triton", f"triton:{settings.url}/{settings.model}", int(inp["dims"][0]),
                                 True, class_names)
        self._remote_ready = True
        self._poller = threading.Thread(target=self._poll_health, name="rtmdet-triton-health", daemon=True)
        self._poller.start()

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
        return self._remote_ready

    def _close_clients(self) -> None:
        self.client.close()
        self._health_client.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=self.settings.health_interval_s + self.settings.health_timeout_s + 1)
        self._close_clients()

    # -- the network ----------------------------------------------------------------------------------
    def forward(self, batch_uint8: torch.Tensor) -> HeadOutputs:
        data = batch_uint8.cpu().numpy()
        step = self.max_batch_size or data.shape[0]
        parts = [self._infer(data[i:i + step]) for i in range(0, data.shape[0], step)]
        outs = {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}
        return head_outputs(outs, self.info.strides)

    def warmup(self, batch_sizes: Sequence[int], input_size: int) -> None:
        for b in batch_sizes:
            self.forward(blank_batch(b, input_size))

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


def build(spec: ModelSpec) -> TritonRunner:
    try:
        return TritonRunner(spec.triton, spec.class_names)
    except BackendUnavailable:
        raise
    except Exception as exc:  # tritonclient's InferenceServerException, bad config, ...
        raise BackendUnavailable(f"Triton backend: {type(exc).__name__}: {exc}") from None
