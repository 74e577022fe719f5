"""gRPC (grpc.aio): rtmdet.v1.Detector over the same pipeline as HTTP, plus health and reflection."""
from __future__ import annotations

import asyncio
import secrets
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service.batcher import BatchFailed, DeadlineExceeded, NotAccepting, QueueFull
from service.imaging import ImageError
from service.pipeline import DetectionService, DetectOutcome, InvalidRequest
from service.proto_gen.rtmdet.v1 import detector_pb2 as pb
from service.proto_gen.rtmdet.v1 import detector_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name  # "rtmdet.v1.Detector"
MESSAGE_OVERHEAD = 64 * 1024


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status that answers a failed request, mirroring the HTTP codes."""
    if isinstance(exc, ImageError):
        return grpc.StatusCode[exc.grpc_code], str(exc)
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, NotAccepting):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, BatchFailed):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def response_from(out: DetectOutcome, info: dict, request_id: str) -> pb.DetectResponse:
    d, t = out.detections, out.times
    ms = 1000.0
    return pb.DetectResponse(
        width=out.width, height=out.height, request_id=request_id,
        model=pb.ModelSummary(name=info["name"], size=info["size"], version=info["version"]),
        detections=[pb.Detection(box=pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]), score=float(s), label=int(lbl),
                                 class_name=n)
                    for b, s, lbl, n in zip(d.boxes.tolist(), d.scores, d.labels, d.class_names)],
        timing=pb.Timing(decode_ms=t.decode * ms, preprocess_ms=t.preprocess * ms, queue_ms=t.queue_wait * ms,
                         inference_ms=t.inference * ms, postprocess_ms=t.postprocess * ms,
                         total_ms=(time.perf_counter() - out.started) * ms, batch_size=t.batch_size))


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, service: DetectionService) -> None:
        self.service = service
        self.metrics = service.metrics

    async def _detect(self, request: pb.DetectRequest, deadline: float | None) -> pb.DetectResponse:
        svc = self.service
        params = svc.params(request.score_threshold if request.HasField("score_threshold") else None,
                            request.max_detections if request.HasField("max_detections") else None,
                            list(request.classes))
        kind = request.WhichOneof("image")
        if kind == "encoded":
            out = await svc.detect_encoded(request.encoded, params, deadline)
        elif kind == "raw":
            r = request.raw
            out = await svc.detect_raw(r.data, r.height, r.width, r.channels,
                                       r.channel_order == pb.CHANNEL_ORDER_RGB, params, deadline)
        else:
            raise InvalidRequest("the request carries no image: set `encoded` or `raw`")
        return response_from(out, svc.describe(), request.request_id)

    async def _counted(self, endpoint: str, request: pb.DetectRequest, deadline: float | None) -> pb.DetectResponse:
        """One detection, recorded in the metrics; failures come back as RequestFailed."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.in_flight.labels(protocol="grpc").inc()
        try:
            return await self._detect(request, deadline)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, details = status_for(exc)
            raise RequestFailed(code, details) from None
        finally:
            self.metrics.in_flight.labels(protocol="grpc").dec()
            self.metrics.request_latency.labels(protocol="grpc", endpoint=endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(protocol="grpc", endpoint=endpoint, status=code.name).inc()

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return time.monotonic() + remaining if remaining is not None else None

    async def Detect(self, request, context):
        try:
            return await self._counted("Detect", request, self._deadline(context))
        except RequestFailed as exc:
            await context.abort(exc.code, exc.details)

    async def DetectStream(self, request_iterator, context):
        """Frames are pipelined (up to `max_batch_size` in flight, so they can share batches) and answered
        in order. The first failing frame ends the stream with its status."""
        window = max(1, self.service.settings.max_batch_size)
        pending: asyncio.Queue = asyncio.Queue(maxsize=window)

        async def read_frames() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._counted("DetectStream", request, self._deadline(context)))
                    await pending.put(task)
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read_frames())
        try:
            while True:
                task = await pending.get()
                if task is None:
                    break
                try:
                    yield await task
                except RequestFailed as exc:
                    await context.abort(exc.code, exc.details)
            await reader  # surfaces errors from reading the stream
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    async def GetModelInfo(self, request, context):
        try:
            info = self.service.describe()
        except NotAccepting as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.ModelInfo(name=info["name"], size=info["size"], version=info["version"],
                            classes=info["classes"], input_size=int(info["input_size"]), device=info["device"],
                            dtype=info["dtype"], weights_sha256=info.get("weights_sha256") or "",
                            backend=info.get("backend", ""))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Detector calls need `authorization: Bearer <key>` metadata; health and reflection stay open."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return await continuation(details)
        meta = {k: v for k, v in (details.invocation_metadata or ())}
        scheme, _, token = str(meta.get("authorization", "")).partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self._key):
            return await continuation(details)
        handler = await continuation(details)
        message = "missing or wrong API key; send metadata `authorization: Bearer <key>`"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is not None and handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, handler.request_deserializer,
                                                         handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer if handler else None,
                                                   handler.response_serializer if handler else None)


def create_grpc_server(service: DetectionService,
                       address: str) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    """A grpc.aio server with the Detector, health (NOT_SERVING until ready) and reflection; returns the
    bound port (useful with port 0)."""
    s = service.settings
    limit = s.max_upload_bytes + MESSAGE_OVERHEAD  # bigger messages get RESOURCE_EXHAUSTED from gRPC itself
    interceptors = [ApiKeyInterceptor(s.api_key_value())] if s.api_key_value() else []
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", limit),
                                                                 ("grpc.max_send_message_length", limit)])
    pb_grpc.add_DetectorServicer_to_server(DetectorServicer(service), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, health, port


async def set_serving(health: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
