"""A small Python client for both protocols; both return the JSON shape of POST /detect."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np

from service.tls import client_ssl_context

ImageInput = bytes | str | os.PathLike
PathLike = str | os.PathLike


def _read_optional(path: PathLike | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _image_bytes(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class HttpDetectorClient:
    """`HttpDetectorClient("http://127.0.0.1:8000").detect("cat.jpg")` -> dict."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, ca: PathLike | None = None, cert: PathLike | None = None,
                 key: PathLike | None = None) -> None:
        """`ca`: the CA file that signed the server's certificate (default: the system's roots), for an
        https:// URL; `cert`/`key`: this client's certificate and key, for a server that demands one (mTLS)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify = client_ssl_context(ca, cert, key) if (ca or cert or base_url.startswith("https:")) else True
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HttpDetectorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _query(score_threshold, max_detections, classes, timeout_ms) -> dict:
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

    def _post(self, path: str, image: ImageInput, content_type: str, **params) -> httpx.Response:
        r = self.http.post(path, content=_image_bytes(image), headers={"Content-Type": content_type},
                           params=self._query(**params))
        r.raise_for_status()
        return r

    def detect(self, image: ImageInput, score_threshold: float | None = None, max_detections: int | None = None,
               classes: Sequence[str] | None = None, timeout_ms: float | None = None,
               content_type: str = "image/jpeg", model: str | None = None) -> dict:
        """Sends the bytes as the raw body; the server sniffs the real type, so any supported one works.
        `model`: a served model's name (default: the server's default model)."""
        path = f"/v1/models/{model}/detect" if model else "/detect"
        return self._post(path, image, content_type, score_threshold=score_threshold,
                          max_detections=max_detections, classes=classes, timeout_ms=timeout_ms).json()

    def render(self, image: ImageInput, **params) -> bytes:
        return self._post("/detect/render", image, "image/jpeg", score_threshold=params.get("score_threshold"),
                          max_detections=params.get("max_detections"), classes=params.get("classes"),
                          timeout_ms=params.get("timeout_ms")).content

    def model(self, name: str | None = None) -> dict:
        r = self.http.get(f"/v1/models/{name}" if name else "/v1/model")
        r.raise_for_status()
        return r.json()

    def models(self) -> list[dict]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return r.json()["models"]

    def reload(self, name: str, weights: str | None = None, admin_key: str | None = None) -> dict:
        """Load a new version of `name` (from `weights`, else its current file) and swap it in once checked."""
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        r = self.http.post(f"/v1/models/{name}/reload", json={"weights": weights} if weights else None,
                           headers=headers)
        r.raise_for_status()
        return r.json()


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


class GrpcDetectorClient:
    """`GrpcDetectorClient("127.0.0.1:50051").detect("cat.jpg")` -> dict (or `.detect_pb` for the message)."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, timeout: float = 60.0,
                 max_message_bytes: int = 64 * 1024 * 1024, ca: PathLike | None = None,
                 cert: PathLike | None = None, key: PathLike | None = None, tls: bool = False) -> None:
        """TLS when `tls` or any of `ca` (the CA that signed the server's certificate; default: gRPC's
        roots), `cert`/`key` (this client's certificate and key, for mTLS) is given."""
        import grpc

        from service.proto_gen.rtmdet.v1 import detector_pb2, detector_pb2_grpc

        self.pb = detector_pb2
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        if tls or ca or cert or key:
            creds = grpc.ssl_channel_credentials(root_certificates=_read_optional(ca),
                                                 private_key=_read_optional(key),
                                                 certificate_chain=_read_optional(cert))
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = detector_pb2_grpc.DetectorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcDetectorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def detect_pb(self, image, timeout: float | None = None, **params):
        return self.stub.Detect(self.request(image, **params), timeout=timeout or self.timeout,
                                metadata=self.metadata)

    def detect(self, image, timeout: float | None = None, **params) -> dict:
        return response_to_dict(self.detect_pb(image, timeout=timeout, **params))

    def detect_stream(self, frames: Iterable, timeout: float | None = None, **params) -> Iterator[dict]:
        requests = (self.request(f, request_id=str(i), **params) for i, f in enumerate(frames))
        for resp in self.stub.DetectStream(requests, timeout=timeout or self.timeout, metadata=self.metadata):
            yield response_to_dict(resp)

    def model(self, name: str | None = None) -> dict:
        from google.protobuf.json_format import MessageToDict
        info = self.stub.GetModelInfo(self.pb.GetModelInfoRequest(model=name or ""), timeout=self.timeout,
                                      metadata=self.metadata)
        return MessageToDict(info, preserving_proto_field_name=True)

    def models(self) -> list[dict]:
        from google.protobuf.json_format import MessageToDict
        listing = self.stub.ListModels(self.pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)
        return [MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                for m in listing.models]
