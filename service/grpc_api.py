"""gRPC (grpc.aio): rtmdet.v1.Detector over the same pipeline as HTTP, plus health and reflection.

Errors, auth and metrics are the shared ones (`service.errors`, `service.auth`, `service.metrics`); responses
are built from the same pydantic objects as the JSON, so both protocols say the same thing.
"""
from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from service import logs
from service.auth import check_bearer
from service.errors import InvalidRequest, ServiceError, TooManyImages, Unauthorized
from service.metrics import RequestRecord
from service.pipeline import DetectionService, DetectOutcome
from service.proto_gen.rtmdet.v1 import detector_pb2 as pb
from service.proto_gen.rtmdet.v1 import detector_pb2_grpc as pb_grpc
from service.schemas import DetectQuery, ModelInfo
from service.tracing import REQUEST_ID_ATTR, TRACER_NAME, traceparent

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name  # "rtmdet.v1.Detector"
MESSAGE_OVERHEAD = 64 * 1024


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status that answers a failed request: the one its `ServiceError` names."""
    if isinstance(exc, ServiceError):
        return grpc.StatusCode[exc.grpc_code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple = (), http_status: int = 500) -> None:
        super().__init__(details)
        self.code, self.details, self.metadata, self.http_status = code, details, metadata, http_status


def response_from(out: DetectOutcome, request_id: str) -> pb.DetectResponse:
    d, t = out.detections, out.times
    ms = 1000.0
    return pb.DetectResponse(
        width=out.width, height=out.height, request_id=request_id,
        model=pb.ModelSummary(name=out.network, size=out.size, version=out.version, model=out.model),
        detections=[pb.Detection(box=pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]), score=s, label=lbl, class_name=n)
                    for b, s, lbl, n in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), d.class_names)],
        timing=pb.Timing(decode_ms=t.decode * ms, preprocess_ms=t.preprocess * ms, queue_ms=t.queue_wait * ms,
                         inference_ms=t.inference * ms, postprocess_ms=t.postprocess * ms,
                         total_ms=(time.perf_counter() - out.started) * ms, batch_size=t.batch_size))


def model_info_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(name=info.name, size=info.size, version=info.version, classes=info.classes,
                        input_size=info.input_size, device=info.device, dtype=info.dtype,
                        weights_sha256=info.weights_sha256 or "", backend=info.backend, model=info.model,
                        state=info.state, default=info.default, error=info.error or "", runner=info.runner,
                        runner_choice=info.runner_choice or "", sparse_regression=info.sparse_regression,
                        canvas=info.canvas)


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, service: DetectionService) -> None:
        self.service = service
        self.metrics = service.metrics

    async def _detect(self, request: pb.DetectRequest, deadline: float | None, record: RequestRecord,
                      index: int | None = None, request_id: str | None = None) -> pb.DetectResponse:
        svc = self.service
        model = svc.registry.slot(request.model or None).name  # NOT_FOUND naming the known ones
        record.model = model
        # Unvalidated here: `DetectionService.params` checks the ranges and answers INVALID_ARGUMENT.
        query = DetectQuery.model_construct(
            score_threshold=request.score_threshold if request.HasField("score_threshold") else None,
            max_detections=request.max_detections if request.HasField("max_detections") else None,
            classes=list(request.classes))
        kind = request.WhichOneof("image")
        if kind == "encoded":
            out = await svc.detect_encoded(model, request.encoded, query, deadline, index)
        elif kind == "raw":
            r = request.raw
            out = await svc.detect_raw(model, r.data, r.height, r.width, r.channels,
                                       r.channel_order == pb.CHANNEL_ORDER_RGB, query, deadline, index)
        else:
            raise InvalidRequest("the request carries no image: set `encoded` or `raw`")
        return response_from(out, request.request_id or request_id or "")

    async def _counted(self, endpoint: str, request: pb.DetectRequest, deadline: float | None,
                       index: int | None = None, request_id: str | None = None) -> pb.DetectResponse:
        """One detection, recorded in the metrics; failures come back as RequestFailed."""
        record = RequestRecord(self.metrics, "grpc", endpoint)
        code = grpc.StatusCode.OK
        try:
            return await self._detect(request, deadline, record, index, request_id)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, details = status_for(exc)
            metadata = exc.trailing_metadata() if isinstance(exc, ServiceError) else ()
            raise RequestFailed(code, details, metadata, getattr(exc, "http_status", 500)) from None
        finally:
            record.finish(code.name)

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return time.monotonic() + remaining if remaining is not None else None

    @staticmethod
    async def _call_ids(context: grpc.aio.ServicerContext, field_id: str = "") -> str:
        """The call's request id (metadata `x-request-id`, else the message's `request_id`, else made), sent
        back at once in the initial metadata with the trace's `traceparent` (when tracing is on)."""
        given = next((v for k, v in (context.invocation_metadata() or ()) if k == logs.REQUEST_ID_HEADER), None)
        rid = logs.request_id_from(given or field_id or None)
        span = trace.get_current_span()  # the gRPC instrumentation's server span, when tracing is on
        if span.is_recording():
            span.set_attribute(REQUEST_ID_ATTR, rid)
        parent = traceparent(span)
        await context.send_initial_metadata(((logs.REQUEST_ID_HEADER, rid),) + ((("traceparent", parent),)
                                                                                if parent else ()))
        return rid

    async def Detect(self, request, context):
        rid = await self._call_ids(context, request.request_id)
        with logs.request_scope(rid, "grpc", "/rtmdet.v1.Detector/Detect") as ctx:
            try:
                response = await self._counted("Detect", request, self._deadline(context), request_id=rid)
            except RequestFailed as exc:
                logs.access(ctx, exc.code.name)
                await context.abort(exc.code, exc.details, exc.metadata)
            logs.access(ctx, "OK")
            return response

    async def DetectBatch(self, request, context):
        """Each entry through `_counted` concurrently (so they share batches); failures stay in their entry."""
        rid = await self._call_ids(context)
        with logs.request_scope(rid, "grpc", "/rtmdet.v1.Detector/DetectBatch") as ctx:
            cap = self.service.settings.max_images_per_request
            if len(request.requests) > cap:
                code, details = status_for(TooManyImages(
                    f"{len(request.requests)} images in one request; the limit is {cap} "
                    "(RTMDET_MAX_IMAGES_PER_REQUEST)"))
                logs.access(ctx, code.name)
                await context.abort(code, details)
            if not request.requests:
                logs.access(ctx, "INVALID_ARGUMENT")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "DetectBatch needs at least one request")
            deadline = self._deadline(context)
            results = await asyncio.gather(*(self._counted("DetectBatch", r, deadline, index=i)
                                             for i, r in enumerate(request.requests)), return_exceptions=True)
            entries = []
            for r in results:
                if isinstance(r, RequestFailed):
                    entries.append(pb.DetectBatchEntry(error=pb.EntryError(
                        code=r.code.value[0], code_name=r.code.name, message=r.details,
                        http_status=r.http_status)))
                elif isinstance(r, BaseException):
                    raise r
                else:
                    entries.append(pb.DetectBatchEntry(result=r))
            logs.access(ctx, "OK")
            return pb.DetectBatchResponse(entries=entries, request_id=rid)

    async def DetectStream(self, request_iterator, context):
        """Frames are pipelined (up to `max_batch_size` in flight, so they can share batches) and answered
        in order. The first failing frame ends the stream with its status. The call has one request id
        (metadata `x-request-id`, else made) and one access line; each frame echoes its own `request_id`."""
        window = max(1, self.service.settings.max_batch_size)
        pending: asyncio.Queue = asyncio.Queue(maxsize=window)
        ctx = logs.RequestContext(await self._call_ids(context), "grpc", "/rtmdet.v1.Detector/DetectStream")
        status = "CANCELLED"  # unless the stream ends or a frame fails

        async def read_frames() -> None:
            logs.current.set(ctx)  # this task's own context: the frames it starts log with the call's id
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
                    status = exc.code.name
                    await context.abort(exc.code, exc.details, exc.metadata)
            await reader  # surfaces errors from reading the stream
            status = "OK"
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
            logs.access(ctx, status)

    async def GetModelInfo(self, request, context):
        try:
            info = self.service.model_info(request.model or None)
        except ServiceError as exc:
            await context.abort(*status_for(exc))
        if info.state != "ready":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"model {info.model!r} is not ready ({info.state})")
        return model_info_message(info)

    async def ListModels(self, request, context):
        listing = self.service.model_list()
        return pb.ListModelsResponse(default_model=listing.default,
                                     models=[model_info_message(m) for m in listing.models])


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Detector calls need `authorization: Bearer <key>` metadata; health and reflection stay open."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return await continuation(details)
        meta = {k: v for k, v in (details.invocation_metadata or ())}
        try:
            check_bearer(str(meta.get("authorization", "")), self._key, where="metadata `authorization: Bearer <key>`")
            return await continuation(details)
        except Unauthorized as exc:
            code, message = status_for(exc)
        handler = await continuation(details)

        async def deny(request, context):
            await context.abort(code, message)

        if handler is not None and handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, handler.request_deserializer,
                                                         handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer if handler else None,
                                                   handler.response_serializer if handler else None)


def create_grpc_server(service: DetectionService, address: str, credentials: grpc.ServerCredentials | None = None,
                       tracer_provider=None) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    """A grpc.aio server with the Detector, health (NOT_SERVING until ready) and reflection; returns the
    bound port (useful with port 0). With `credentials` (service.tls) the port speaks TLS only; with a
    `tracer_provider` (service.tracing) every call gets a server span (W3C `traceparent` metadata honoured)."""
    s = service.settings
    # A DetectBatch message holds up to max_images_per_request images; bigger messages get RESOURCE_EXHAUSTED
    # from gRPC itself.
    limit = s.max_upload_bytes * s.max_images_per_request + MESSAGE_OVERHEAD
    interceptors = [ApiKeyInterceptor(s.api_key_value())] if s.api_key_value() else []
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        service.tracer = tracer_provider.get_tracer(TRACER_NAME)
        interceptors.insert(0, aio_server_interceptor(tracer_provider=tracer_provider))
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", limit),
                                                                 ("grpc.max_send_message_length", limit)])
    pb_grpc.add_DetectorServicer_to_server(DetectorServicer(service), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, health, port


async def set_serving(health: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
