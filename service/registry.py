"""Models by name and version: load beside, check, swap, drain, unload.

A *slot* is one model name; it holds at most one *current* `ModelVersion` (a `Detector` and its own
batcher). A request takes a *lease* on the current version and keeps it until it is answered. A reload
builds and warms the new version beside the old one, checks it (the weights load strictly, a forward on
a probe image is finite), then swaps it in under the registry's lock: requests admitted before the swap
finish on the old version, requests after it go to the new one. The old version is closed (batcher
stopped, runner released, memory returned) when its last lease ends. A reload that fails leaves the old
version serving and raises `ReloadFailed` with the reason.

Specs come from `service.model_specs`: `--model NAME=PATH,...`, a model repository (`DIR/<model>/<version>/` holding
one weights file and an optional `config.yaml`; the highest version is served), or, with neither, from
RTMDET_WEIGHTS (the shipped model).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import TestConfig
from model.inference.detector import Detector
from service.backends import create_runner
from service.batcher import DynamicBatcher
from service.errors import BackendUnavailable, ModelNotFound, NotAccepting, ReloadFailed
from service.metrics import ServiceMetrics
from service.model_specs import initial_specs, repository_specs
from service.settings import ModelSpec, ServiceSettings

log = logging.getLogger("rtmdet.registry")


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def probe_image() -> np.ndarray:
    """A fixed, non-trivial BGR image for the reload check (noise over a gradient: every layer sees signal)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None]
    return np.clip(ramp + rng.normal(0, 40, (240, 320, 3)), 0, 255).astype(np.uint8)


def release_freed_memory() -> None:
    """Collect cycles and hand freed heap back to the OS (glibc keeps freed arenas otherwise, and RSS would
    not show that an old version is gone)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelVersion:
    """One loaded set of weights: its detector, its batcher, its leases."""

    def __init__(self, spec: ModelSpec, detector: Detector, batcher: DynamicBatcher, on_close=None) -> None:
        self.spec = spec
        self._on_close = on_close
        self.detector = detector
        self.batcher = batcher
        sha = detector.info.weights_sha256 or ""
        self.version = spec.version or (sha[:12] if sha else "unknown")
        self.class_index = {n: i for i, n in enumerate(detector.class_names)}
        self.loaded_at = time.time()
        self._leases = 0
        self._retired = False
        self._closing = False
        self._closed = threading.Event()  # set once the batcher stopped and the runner is released
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def can_serve(self) -> bool:
        return not self._closing and self.batcher.running and self.detector.runner.is_ready()

    def _acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            close = self._retired and self._leases == 0
        if close:
            # The batcher's worker is joined here: never on the event loop.
            threading.Thread(target=self.close, name=f"rtmdet-close-{self.name}", daemon=True).start()

    def retire(self) -> None:
        """No new leases will be taken (the registry swapped it out); close once the last one ends."""
        with self._lock:
            self._retired = True
            close = self._leases == 0
        if close:
            self.close()

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self.batcher.stop(timeout=timeout)
        self.detector.close()
        if self._on_close is not None:
            self._on_close()
        release_freed_memory()
        self._closed.set()
        log.info("model %s version %s closed", self.name, self.version)

    def wait_closed(self, timeout: float) -> bool:
        return self._closed.wait(timeout)


@dataclass
class ModelSlot:
    """A model name: its spec, its current version, and what happened to the last load."""

    name: str
    spec: ModelSpec
    current: ModelVersion | None = None
    state: str = "loading"  # loading, ready, failed, unloaded
    error: str | None = None
    from_repository: bool = False
    reload_lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRegistry:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics, specs: list[ModelSpec] | None = None,
                 runner_factory=create_runner) -> None:
        self.settings = settings
        self.metrics = metrics
        self._runner_factory = runner_factory
        self._lock = threading.Lock()
        self._slots: dict[str, ModelSlot] = {}
        initial = specs if specs is not None else initial_specs(settings)
        for spec in initial:
            self._slots[spec.name] = ModelSlot(spec.name, spec, from_repository=spec.version is not None)
        self.default_name = initial[0].name if initial else settings.model_name

    # -- looking up -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def slots(self) -> list[ModelSlot]:
        with self._lock:
            return list(self._slots.values())

    def slot(self, name: str | None) -> ModelSlot:
        name = name or self.default_name
        with self._lock:
            found = self._slots.get(name)
            if found is None:
                raise ModelNotFound(f"no model named {name!r}; this server has {sorted(self._slots)}")
            return found

    @contextlib.contextmanager
    def lease(self, name: str | None) -> Iterator[ModelVersion]:
        """The current version of `name`, held until the block ends (it will not be closed under the caller)."""
        slot = self.slot(name)
        with self._lock:
            version = slot.current
            if version is None or not version.can_serve():
                raise NotAccepting(f"model {slot.name!r} is not ready ({slot.state})")
            version._acquire()
        try:
            yield version
        finally:
            version.release()

    # -- loading ----------------------------------------------------------------------------------------
    def build_version(self, spec: ModelSpec) -> ModelVersion:
        """Blocking: runner, detector, warm-up, check, batcher. Raises BackendUnavailable or ValueError."""
        s = self.settings
        runner = self._runner_factory(spec)
        try:
            if s.fault_injection is not None:
                from service.faults import FaultInjectingRunner
                runner = FaultInjectingRunner(runner, s.fault_injection)
            cfg = TestConfig.serving(score_thr=s.score_threshold, max_per_img=s.max_detections_limit,
                                     input_size=spec.input_size or runner.info.input_size or 640, canvas=spec.canvas)
            detector = Detector.from_runner(runner, cfg)
            if spec.num_classes is not None and detector.num_classes != spec.num_classes:
                raise ValueError(f"{spec.weights}: the network has {detector.num_classes} classes; model "
                                 f"{spec.name!r} is pinned to {spec.num_classes}")
            if s.warmup:
                t0 = time.perf_counter()
                detector.warmup(warmup_batch_sizes(s.max_batch_size))
                log.info("model %s warmed up in %.2f s", spec.name, time.perf_counter() - t0)
            detector.probe(probe_image())
        except BaseException:
            runner.close()
            raise
        slo_ms = spec.latency_slo_ms or s.latency_slo_ms
        batcher = DynamicBatcher(detector, self.metrics.for_model(spec.name), s.max_batch_size,
                                 s.max_queue_delay_ms / 1000.0, s.max_queue_size,
                                 inference_timeout_s=s.inference_timeout_s,
                                 latency_slo_s=slo_ms / 1000.0 if slo_ms else None,
                                 max_in_flight=batches_in_flight(s, detector, slo_ms))
        batcher.start()
        gauge = self.metrics.versions_loaded.labels(model=spec.name)
        gauge.inc()
        return ModelVersion(spec, detector, batcher, on_close=gauge.dec)

    def _install(self, slot: ModelSlot, version: ModelVersion) -> ModelVersion | None:
        with self._lock:
            old, slot.current = slot.current, version
            slot.spec, slot.state, slot.error = version.spec, "ready", None
        self.metrics.set_model_info(info_labels(version), info_labels(old) if old is not None else None)
        return old

    def load(self, name: str) -> ModelVersion:
        """Blocking: the first load of a slot (start-up); failure marks the slot failed and raises."""
        slot = self.slot(name)
        with slot.reload_lock:
            try:
                version = self.build_version(slot.spec)
            except Exception as exc:
                slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
                self.metrics.reloads.labels(model=name, outcome="failed").inc()
                raise
            self._install(slot, version)
            self.metrics.reloads.labels(model=name, outcome="loaded").inc()
            log.info("model %s version %s loaded (%s)", name, version.version, slot.spec.weights)
            return version

    def load_all(self) -> None:
        for name in self.names():
            self.load(name)

    def reload(self, name: str, weights: Path | None = None, spec: ModelSpec | None = None) -> ModelVersion:
        """Blocking: a new version beside the old; swapped in only once it loaded, warmed and passed the check."""
        slot = self.slot(name)
        if not slot.reload_lock.acquire(timeout=self.settings.request_timeout_s):
            raise ReloadFailed(f"model {name!r}: another reload is still running")
        try:
            new_spec = spec or slot.spec
            if weights is not None:
                new_spec = new_spec.model_copy(update={"weights": Path(weights), "version": None})
            t0 = time.perf_counter()
            try:
                version = self.build_version(new_spec)
            except (BackendUnavailable, ValueError, OSError, RuntimeError) as exc:
                self.metrics.reloads.labels(model=name, outcome="failed").inc()
                log.error("reload of %s from %s failed; version %s keeps serving: %s", name, new_spec.weights,
                          slot.current.version if slot.current else None, exc)
                raise ReloadFailed(f"model {name!r}: reload from {new_spec.weights} failed, the current version "
                                   f"keeps serving: {' '.join(str(exc).splitlines())}") from None
            old = self._install(slot, version)
            self.metrics.reloads.labels(model=name, outcome="reloaded").inc()
            log.info("model %s: version %s serving (loaded and checked in %.2f s); %s retiring", name,
                     version.version, time.perf_counter() - t0, old.version if old else None)
        finally:
            slot.reload_lock.release()
        if old is not None:
            old.retire()  # closes (and frees) it now, or when its last lease ends
        return version

    def unload(self, name: str) -> None:
        slot = self.slot(name)
        with slot.reload_lock:
            with self._lock:
                old, slot.current, slot.state = slot.current, None, "unloaded"
            if old is not None:
                self.metrics.set_model_info(None, info_labels(old))
                old.retire()

    def add(self, spec: ModelSpec) -> ModelSlot:
        with self._lock:
            slot = self._slots.setdefault(spec.name, ModelSlot(spec.name, spec,
                                                                from_repository=spec.version is not None))
        return slot

    def remove(self, name: str) -> None:
        self.unload(name)
        with self._lock:
            self._slots.pop(name, None)

    # -- the repository -------------------------------------------------------------------------------
    def rescan(self) -> list[str]:
        """Blocking: re-read the model repository; load new models and newer versions (each checked as a reload
        is), unload models whose folder went away. Returns what it did, one line per change; a failed
        version is logged and skipped (the old one keeps serving)."""
        root = self.settings.model_repository
        if root is None:
            return []
        found = {spec.name: spec for spec in repository_specs(root, self.settings)}
        changes = []
        for spec in found.values():
            known = spec.name in self.names()
            slot = self.add(spec)
            current = slot.current
            if known and current is not None and current.spec.version == spec.version \
                    and current.spec.weights == spec.weights:
                continue
            try:
                if current is None:
                    slot.spec = spec
                    self.load(spec.name)
                else:
                    self.reload(spec.name, spec=spec)
                changes.append(f"{spec.name}: version {spec.version} serving")
            except Exception as exc:
                changes.append(f"{spec.name}: version {spec.version} failed: {exc}")
                log.error("repository: %s version %s failed: %s", spec.name, spec.version, exc)
        for slot in self.slots():
            if slot.from_repository and slot.name not in found:
                self.remove(slot.name)
                changes.append(f"{slot.name}: removed from the repository, unloaded")
        return changes

    def shutdown(self, timeout: float = 30.0) -> None:
        for slot in self.slots():
            version = slot.current
            if version is not None:
                version.close(timeout)


def info_labels(version: ModelVersion) -> dict[str, str]:
    i = version.detector.info
    return {"model": version.name, "version": version.version, "name": i.name, "size": i.size,
            "backend": i.backend, "device": i.device, "dtype": i.dtype,
            "input_size": str(version.detector.input_size)}


def batches_in_flight(settings: ServiceSettings, detector: Detector, slo_ms: float | None) -> int:
    """`max_batches_in_flight` where it can help: a runner that takes overlapping calls, batches of two or more (a
    batch of one runs on all the threads), and no SLO (whose batcher learns the times of batches run alone)."""
    if slo_ms or settings.max_batch_size < 2 or not detector.overlapping_calls:
        return 1
    return settings.max_batches_in_flight
