"""`rtmdet serve`: HTTP (uvicorn) and gRPC (grpc.aio) in one asyncio loop, over the model registry.

Start-up: both servers listen at once (/healthz answers, /readyz and gRPC health say "not yet"),
the models load and warm in a thread, then readiness turns on. SIGHUP (and, with
RTMDET_REPOSITORY_POLL_S, a timer) re-reads the model repository: new versions are loaded beside the
old ones and swapped in once checked (see `service.registry`). SIGTERM/SIGINT: readiness turns off,
both servers stop accepting, every request already accepted is answered, the batchers' workers end,
and the process exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

from service import heap, logs, tracing
from service.grpc_api import create_grpc_server, set_serving
from service.http_api import create_app, create_health_app
from service.http_protocol import head_deadline_protocol
from service.pipeline import DetectionService
from service.settings import ServiceSettings
from service.tls import TlsConfigError, load_tls

log = logging.getLogger("rtmdet.serve")


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handlers: this module owns SIGTERM for both protocols."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def follow_readiness(service: DetectionService, health, period_s: float = 0.25) -> None:
    """gRPC health mirrors /readyz: it turns NOT_SERVING while a model step is stuck past the watchdog."""
    serving = True
    while True:
        await asyncio.sleep(period_s)
        ready = service.is_ready()
        if ready != serving:
            serving = ready
            await set_serving(health, ready)
            log.warning("readiness: %s", "ready" if ready else service.not_ready_reason())


async def rescan_repository(service: DetectionService, why: str) -> None:
    """Re-read the model repository in a thread (one rescan at a time); log what changed."""
    log.info("re-reading the model repository (%s)", why)
    for line in await asyncio.to_thread(service.registry.rescan):
        log.info("repository: %s", line)


async def poll_repository(service: DetectionService, period_s: float, lock: asyncio.Lock) -> None:
    while True:
        await asyncio.sleep(period_s)
        async with lock:
            await rescan_repository(service, "poll")


def http_config(app, settings: ServiceSettings, port: int, tls_options: dict) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=port, lifespan="off", log_level="warning",
                          access_log=False, timeout_graceful_shutdown=max(int(settings.shutdown_grace_s), 1),
                          http=head_deadline_protocol(settings.header_timeout_s), **tls_options)


async def serve(settings: ServiceSettings) -> int:
    try:
        # TLS files first: a bad certificate must stop the start before any model loads or port opens.
        tls = load_tls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        service = DetectionService(settings)
    except (TlsConfigError, ValueError) as exc:  # bad TLS files, a bad --model option or model repository
        print(f"rtmdet serve: error: {' '.join(str(exc).splitlines())}", file=sys.stderr, flush=True)
        return 2
    service.log_start_error = False  # reported below as the one `rtmdet serve: error:` line
    tracer_provider = tracing.setup_from_env()
    app = create_app(service, manage_lifecycle=False, tracer_provider=tracer_provider)
    grpc_server, health, grpc_port = create_grpc_server(
        service, f"{settings.host}:{settings.grpc_port}", credentials=tls.grpc_credentials() if tls else None,
        tracer_provider=tracer_provider)
    await set_serving(health, False)
    http = _UvicornServer(http_config(app, settings, settings.http_port, tls.uvicorn_options() if tls else {}))
    # The plain-text probe/scrape port (RTMDET_HEALTH_PORT): health, readiness and metrics only, never detection.
    health_http = (_UvicornServer(http_config(create_health_app(service), settings, settings.health_port, {}))
                   if settings.health_port is not None else None)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rescan_lock = asyncio.Lock()
    background: set[asyncio.Task] = set()

    def on_sighup() -> None:
        async def rescan() -> None:
            async with rescan_lock:
                await rescan_repository(service, "SIGHUP")
        task = asyncio.create_task(rescan())
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)

    if settings.freeze_heap:
        service.metrics.frozen_objects.set(heap.freeze_startup_objects())
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    health_http_task = asyncio.create_task(health_http.serve()) if health_http is not None else None
    load_task = service.start()
    stop_task = asyncio.create_task(stop.wait())
    loading = ", ".join(f"{s.name}={s.spec.weights}" for s in service.registry.slots())
    scheme = "https" if tls else "http"
    security = "" if tls is None else (" TLS+client certificates" if tls.mutual else " TLS")
    plain = f" plain-text health http://{settings.host}:{settings.health_port}" if health_http is not None else ""
    page = f" (open {scheme}://{settings.host}:{settings.http_port}/ in a browser)" if settings.web_ui else ""
    print(f"rtmdet serve: {scheme}://{settings.host}:{settings.http_port}{page} grpc {settings.host}:{grpc_port}"
          f"{security}{plain} (loading {loading})", flush=True)

    exit_code = 0
    done, _ = await asyncio.wait({load_task, http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task in done and load_task.exception() is None:
        await set_serving(health, True)
        models = ", ".join(f"{m.model} {m.version} ({m.name} on {m.device})" for m in service.model_list().models)
        print(f"rtmdet serve: ready: {models}", flush=True)
        health_task = asyncio.create_task(follow_readiness(service, health))
        if settings.model_repository is not None and settings.repository_poll_s > 0:
            background.add(asyncio.create_task(poll_repository(service, settings.repository_poll_s, rescan_lock)))
        done, _ = await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        health_task.cancel()
    elif load_task in done:
        # One line, whatever the loader's message holds, so that it reads well in `kubectl logs` and alerts.
        one_line = " ".join(str(service.start_error).splitlines())
        print(f"rtmdet serve: error: model failed to load: {one_line}", file=sys.stderr, flush=True)
        exit_code = 2
    if http_task in done and not stop.is_set():
        exc = http_task.exception()
        print(f"rtmdet serve: error: HTTP server stopped: {exc or 'could not start'}", file=sys.stderr, flush=True)
        exit_code = exit_code or 1

    # Drain: stop taking new work on both protocols, answer what was accepted, then stop the worker.
    service.draining = True
    loop.remove_signal_handler(signal.SIGHUP)
    for task in list(background):
        task.cancel()
    await health.enter_graceful_shutdown()
    http.should_exit = True
    if health_http is not None:
        health_http.should_exit = True
    await asyncio.gather(grpc_server.stop(settings.shutdown_grace_s), http_task,
                         *([health_http_task] if health_http_task else []), return_exceptions=True)
    if not load_task.done():
        load_task.cancel()
    await asyncio.to_thread(service.shutdown)
    stop_task.cancel()
    tracing.shutdown(tracer_provider)
    print("rtmdet serve: stopped", flush=True)
    return exit_code


def run(settings: ServiceSettings) -> int:
    logs.configure(settings.log_format)
    return asyncio.run(serve(settings))
