"""OpenTelemetry spans, recorded by the SDK's in-memory exporter: the service built by its factories
(`create_app`, `create_grpc_server`) in this process, so the test can hold the exporter; HTTP through the ASGI
app, gRPC through a real grpc.aio server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import os
import time

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from svc_helpers import INPUT_SIZE, ServerProcess, jpeg, serving

from service.grpc_api import create_grpc_server
from service.http_api import create_app
from service.pipeline import DetectionService
from service.proto_gen.rtmdet.v1 import detector_pb2 as pb
from service.proto_gen.rtmdet.v1 import detector_pb2_grpc as pb_grpc
from service.settings import ServiceSettings
from service.tracing import enabled_by_env

STAGES = {"decode", "preprocess", "queue_wait", "inference", "postprocess"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def by_name(spans, name):
    return [s for s in spans if s.name == name]


async def traced_calls(checkpoint, image: bytes):
    """Run the calls the tests inspect; returns (finished spans, HTTP responses, gRPC initial metadata)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = ServiceSettings(weights=checkpoint, device="cpu", input_size=INPUT_SIZE, warmup=False,
                               max_queue_delay_ms=200, decode_threads=2)
    service = DetectionService(settings)
    app = create_app(service, manage_lifecycle=False, tracer_provider=provider)
    server, _, port = create_grpc_server(service, "127.0.0.1:0", tracer_provider=provider)
    await server.start()
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            single = await http.post("/detect", content=image, headers={
                "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "req-single",
                "content-type": "image/jpeg"})
            several = await http.post("/detect", files=[("image", ("a.jpg", image)), ("image", ("b.jpg", image))],
                                      headers={"x-request-id": "req-two"})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.DetectorStub(channel).Detect(pb.DetectRequest(encoded=image), timeout=30, metadata=(
                ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("x-request-id", "req-grpc")))
            await call
            grpc_meta = tuple(await call.initial_metadata())
        # The batch span is written on the worker thread after the answers went out.
        for _ in range(100):
            if len(by_name(exporter.get_finished_spans(), "rtmdet.batch")) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await server.stop(0)
        service.shutdown()
        provider.shutdown()
    return list(exporter.get_finished_spans()), (single, several), grpc_meta


@pytest.fixture(scope="module")
def recorded(checkpoint, photos):
    return asyncio.run(traced_calls(checkpoint, jpeg(photos["coffee"])))


def test_http_request_span_tree_honours_traceparent_and_carries_the_request_id(recorded):
    spans, (single, _), _ = recorded
    assert single.status_code == 200 and single.headers["x-request-id"] == "req-single"
    server = [s for s in spans if s.name == "POST /detect" and s.attributes.get("rtmdet.request_id") == "req-single"]
    assert len(server) == 1
    server = server[0]
    # the incoming traceparent is the server span's parent; the response's traceparent names the server span
    assert f"{server.context.trace_id:032x}" == TRACE_ID and f"{server.parent.span_id:016x}" == PARENT_ID
    assert single.headers["traceparent"] == f"00-{TRACE_ID}-{server.context.span_id:016x}-01"
    detect = [s for s in spans if s.name == "rtmdet.detect" and s.parent and s.parent.span_id == server.context.span_id]
    assert len(detect) == 1
    detect = detect[0]
    assert detect.attributes["rtmdet.request_id"] == "req-single" and detect.attributes["rtmdet.model"] == "default"
    assert detect.attributes["rtmdet.detections"] == len(single.json()["detections"])
    children = [s for s in spans if s.parent and s.parent.span_id == detect.context.span_id]
    assert {c.name for c in children} == STAGES
    for c in children:  # inside the request's span, in order
        assert detect.start_time <= c.start_time <= c.end_time <= detect.end_time + 1_000_000
    order = sorted(children, key=lambda c: c.start_time)
    assert [c.name for c in order] == ["decode", "preprocess", "queue_wait", "inference", "postprocess"]


def test_batch_span_links_every_image_span_that_rode_in_it(recorded):
    spans, (_, several), _ = recorded
    assert several.status_code == 200 and len(several.json()) == 2
    images = [s for s in by_name(spans, "rtmdet.detect") if s.attributes.get("rtmdet.request_id") == "req-two"]
    assert sorted(s.attributes["rtmdet.image_index"] for s in images) == [0, 1]
    assert len({s.context.trace_id for s in images}) == 1  # one request, one trace
    batches = by_name(spans, "rtmdet.batch")
    linked = {(link.context.trace_id, link.context.span_id): b for b in batches for link in b.links}
    for img in by_name(spans, "rtmdet.detect"):  # every image span is linked from exactly one batch span
        batch = linked[(img.context.trace_id, img.context.span_id)]
        inference = [s for s in spans if s.name == "inference" and s.parent.span_id == img.context.span_id][0]
        assert batch.attributes["rtmdet.batch_size"] == len(batch.links) == inference.attributes["rtmdet.batch_size"]
    assert sum(len(b.links) for b in batches) == len(by_name(spans, "rtmdet.detect"))
    # the two images of one call went through the batcher together (200 ms queue delay)
    assert {linked[(s.context.trace_id, s.context.span_id)].context.span_id for s in images}.__len__() == 1


def test_grpc_call_span_honours_traceparent_and_returns_ids(recorded):
    spans, _, meta = recorded
    assert ("x-request-id", "req-grpc") in meta
    server = [s for s in spans if s.name == "/rtmdet.v1.Detector/Detect"]
    assert len(server) == 1 and server[0].attributes["rtmdet.request_id"] == "req-grpc"
    assert f"{server[0].context.trace_id:032x}" == TRACE_ID and f"{server[0].parent.span_id:016x}" == PARENT_ID
    assert dict(meta)["traceparent"] == f"00-{TRACE_ID}-{server[0].context.span_id:016x}-01"
    detect = [s for s in by_name(spans, "rtmdet.detect") if s.parent.span_id == server[0].context.span_id]
    assert len(detect) == 1 and detect[0].attributes["rtmdet.request_id"] == "req-grpc"
    assert {s.name for s in spans if s.parent and s.parent.span_id == detect[0].context.span_id} == STAGES


def test_one_recorded_trace_as_json(recorded, tmp_path):
    """The trace of the single HTTP request (its server span and every descendant) and the batch span that
    links it, as the exporter recorded them (RTMDET_TRACE_DUMP=path copies it out, for the docs)."""
    spans, _, _ = recorded
    root = next(s for s in spans if s.attributes.get("rtmdet.request_id") == "req-single" and s.name == "POST /detect")
    tree, ids = [root], {root.context.span_id}
    for s in sorted(spans, key=lambda s: s.start_time):
        if s.parent is not None and s.parent.span_id in ids and s.context.trace_id == root.context.trace_id:
            tree.append(s)
            ids.add(s.context.span_id)
    tree += [b for b in by_name(spans, "rtmdet.batch") if any(link.context.span_id in ids for link in b.links)]
    dump = [json.loads(s.to_json()) for s in tree]
    assert [d["name"] for d in dump].count("rtmdet.batch") == 1
    assert {d["name"] for d in dump} == {"POST /detect", "rtmdet.detect", "rtmdet.batch", *STAGES}
    path = os.environ.get("RTMDET_TRACE_DUMP") or str(tmp_path / "trace.json")
    with open(path, "w") as f:
        json.dump(dump, f, indent=1)


def test_tracing_is_off_unless_the_environment_asks():
    assert not enabled_by_env({})
    assert enabled_by_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not enabled_by_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not enabled_by_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})
    assert enabled_by_env({"OTEL_TRACES_EXPORTER": "console"})


class OtlpSink:
    """A bare OTLP/HTTP trace receiver on 127.0.0.1: keeps every span the server exports."""

    def __init__(self) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                sink.spans += [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_real_server_exports_otlp_when_the_endpoint_is_set(checkpoint, photos, tmp_path):
    """The environment alone turns tracing on: `rtmdet serve` with OTEL_EXPORTER_OTLP_ENDPOINT sends its spans
    to that endpoint (a receiver in this test), and the trace is the one the client's traceparent named."""

    sink = OtlpSink()
    try:
        with serving(ServerProcess(checkpoint, tmp_path / "otlp.log", OTEL_EXPORTER_OTLP_ENDPOINT=sink.url,
                                   OTEL_BSP_SCHEDULE_DELAY="100", RTMDET_WARMUP="false")) as srv:
            r = httpx.post(f"{srv.http}/detect", content=jpeg(photos["coffee"]), timeout=60, headers={
                "Content-Type": "image/jpeg", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "otlp-1"})
            assert r.status_code == 200 and r.headers["traceparent"].startswith(f"00-{TRACE_ID}-")
            for _ in range(100):
                if {"rtmdet.detect", "rtmdet.batch"} <= {s.name for s in sink.spans}:
                    break
                time.sleep(0.1)
    finally:
        sink.server.shutdown()
    mine = [s for s in sink.spans if s.trace_id.hex() == TRACE_ID]
    assert {s.name for s in mine} == {"POST /detect", "rtmdet.detect", *STAGES}
    (server,) = [s for s in mine if s.name == "POST /detect"]
    assert server.parent_span_id.hex() == PARENT_ID
    assert any(a.key == "rtmdet.request_id" and a.value.string_value == "otlp-1" for a in server.attributes)
    (detect,) = [s for s in mine if s.name == "rtmdet.detect"]
    batches = [s for s in sink.spans if s.name == "rtmdet.batch" and any(
        link.span_id == detect.span_id for link in s.links)]
    assert len(batches) == 1
