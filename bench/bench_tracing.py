"""What tracing costs per request: off (the default: no provider, `service.tracer is None`) against on (the SDK
with a span processor that keeps nothing), in one process, rounds alternating, on the same image.

Two measurements, side by side:
- end to end: `DetectionService.detect_encoded` through the real batcher (small input size, so inference
  does not drown the difference); median µs per request over each mode's rounds;
- the tracing code alone: one request's spans (`ImageSpan` + 5 stage children + its batch span) against the
  off path's one attribute test.

    PYTHONPATH=. .venv/bin/python bench/bench_tracing.py --rounds 6 --requests 40
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from service.batcher import StageTimes  # noqa: E402
from service.pipeline import DetectionService  # noqa: E402
from service.schemas import DetectQuery  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from service.tracing import BatchSpans, ImageSpan  # noqa: E402


class Discard(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


async def end_to_end(service: DetectionService, tracer, image: bytes, n: int) -> float:
    service.tracer = tracer
    for v in service.registry.slots():
        v.current.batcher.on_batch = None  # set again on the first traced request
    query = DetectQuery()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await service.detect_encoded(None, image, query, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def spans_only(tracer, n: int) -> float:
    times = StageTimes(decode=0.001, preprocess=0.001, queue_wait=0.001, inference=0.01, postprocess=0.001,
                       batch_size=1)
    batch = BatchSpans(tracer, "default")
    t0 = time.perf_counter()
    for _ in range(n):
        span = ImageSpan(tracer, "default", "rid")
        times.trace_context = span.span.get_span_context()
        now = time.time()
        span.stages(times, now, now)
        span.finish("v1", 3)
        batch([times], 0.01, 0.001)
    return (time.perf_counter() - t0) / n * 1e6


def off_path(n: int) -> float:
    service_tracer = None
    t0 = time.perf_counter()
    for _ in range(n):
        if service_tracer is not None:
            raise AssertionError
    return (time.perf_counter() - t0) / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--input-size", type=int, default=128)
    args = ap.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    tracer = provider.get_tracer("bench")
    with tempfile.TemporaryDirectory():
        settings = ServiceSettings(device="cpu", input_size=args.input_size, warmup=True, decode_threads=1,
                                   max_queue_delay_ms=0)
        service = DetectionService(settings)
        await service.start()
        image = cv2.imencode(".jpg", np.full((240, 320, 3), 128, np.uint8))[1].tobytes()
        off, on = [], []
        for _ in range(args.rounds):
            off.append(await end_to_end(service, None, image, args.requests))
            on.append(await end_to_end(service, tracer, image, args.requests))
        service.shutdown()
    print(f"end to end, median per request over {args.rounds} alternating rounds of {args.requests}: "
          f"off {statistics.median(off):.0f} µs, on {statistics.median(on):.0f} µs "
          f"(on/off {statistics.median(on) / statistics.median(off):.3f})")
    print(f"tracing code alone per request: on {spans_only(tracer, 2000):.1f} µs, off {off_path(100000) * 1000:.1f} ns")


if __name__ == "__main__":
    asyncio.run(main())
