"""`auto` on the CPU: measure the candidate runners on this machine, keep the fastest that gives eager's outputs.

Which runner is fastest depends on the CPU (AVX-512, AMX), the thread count, the model size and the batch:
here, for tiny at 640 on 1 thread, inductor, ONNX Runtime and OpenVINO are within 10% of each other and the
order changes from run to run, so the choice is measured rather than assumed.

How, on the first batch the Detector sees (its warm-up's first size, normally batch 1):
- eager runs first; its outputs are the reference.
- each candidate is built (one ONNX export serves ONNX Runtime and OpenVINO; a runner that cannot be built,
  e.g. its package is not installed, is skipped and says why), run `WARM_CALLS` times, then checked: the
  largest difference from eager on any output, relative to that output's peak, must be <= `PEAK_TOLERANCE`
  (1e-4, float32), else it is refused;
- then all candidates are timed in `ROUNDS` alternating rounds of one call each (a shared machine's load
  falls on all of them alike); the median decides.
Cost, bounded by construction: one ONNX export (~10 s for tiny here), one inductor compile (~5-20 s for
tiny), and WARM_CALLS + ROUNDS = 7 forwards per candidate: 10-15 s for tiny at 320 on 1 thread here (measured,
inductor's compile cache warm); more at 640 and for larger sizes.
The result (every candidate's median and error) is kept in `AutoChoice` (`Detector.auto_choice`) and logged;
`Detector.describe()['accelerate']` names the runner chosen.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from model.inference.accelerate import EagerRunner, InductorRunner, Outputs, Runner

log = logging.getLogger("rtmdet.runner")
CANDIDATES = ("eager", "inductor", "onnxruntime", "openvino")
PEAK_TOLERANCE = 1e-4
WARM_CALLS = 2
ROUNDS = 5


def peak_relative_error(got: Outputs, want: Outputs) -> float:
    """The worst output's max |got - want| over max |want| (0/0 counts as exact)."""
    worst = 0.0
    for g, w in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        if g.shape != w.shape:
            return float("inf")
        peak = float(w.abs().max())
        diff = float((g.float() - w.float()).abs().max())
        worst = max(worst, diff / peak if peak > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


@dataclass
class Measurement:
    name: str
    build_s: float = 0.0
    median_ms: float | None = None
    peak_rel_error: float | None = None
    refused: str | None = None  # why the candidate was not timed


@dataclass
class AutoChoice:
    chosen: str
    batch: int
    threads: int
    measurements: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = []
        for m in self.measurements:
            parts.append(f"{m.name} {m.median_ms:.1f} ms" if m.median_ms is not None else f"{m.name} ({m.refused})")
        return f"auto runner: {self.chosen} (batch {self.batch}, {self.threads} threads: {', '.join(parts)})"


def _builders(net: nn.Module, normalize: Callable, example: torch.Tensor, strides: Sequence[int], threads: int,
              candidates: Sequence[str]) -> dict[str, Callable[[], Runner]]:
    builders: dict[str, Callable[[], Runner]] = {}
    exported: dict[str, object] = {}

    def onnx_runner(mode: str) -> Runner:
        # One export for both runtimes; each reads the file when built, so both are built inside the context.
        from model.inference.onnx_runners import build_onnx_runner, export_network

        if not exported:
            wanted = [m for m in ("onnxruntime", "openvino") if m in candidates]
            try:
                with export_network(net, strides, int(example.shape[1])) as path:
                    for m in wanted:
                        try:
                            exported[m] = build_onnx_runner(m, path, threads)
                        except Exception as exc:  # e.g. the package is not installed: skip it, say why
                            exported[m] = exc
            except Exception as exc:  # the export itself (e.g. no onnxscript): neither runtime can run
                exported.update({m: exc for m in wanted})
        runner = exported[mode]
        if isinstance(runner, Exception):
            raise runner
        return runner

    for name in candidates:
        if name == "inductor":
            builders[name] = lambda: InductorRunner(net, normalize)
        elif name in ("onnxruntime", "openvino"):
            builders[name] = lambda name=name: onnx_runner(name)
        elif name != "eager":
            raise ValueError(f"unknown auto candidate {name!r}; choose from {CANDIDATES}")
    return builders


def choose_runner(net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], example_uint8: torch.Tensor,
                  strides: Sequence[int], threads: int | None = None,
                  candidates: Sequence[str] = CANDIDATES) -> tuple[Runner, AutoChoice]:
    """Measure `candidates` on `example_uint8` (a batch of the serving shape) and return the fastest runner
    whose outputs are within PEAK_TOLERANCE of eager's, with the measurements."""
    threads = threads or torch.get_num_threads()
    builders = _builders(net, normalize, example_uint8, strides, threads, candidates)
    return pick_fastest(EagerRunner(net, normalize), builders, example_uint8, threads)


def pick_fastest(reference: Runner, builders: dict[str, Callable[[], Runner]], example_uint8: torch.Tensor,
                 threads: int) -> tuple[Runner, AutoChoice]:
    """`reference` (named eager) and every runner `builders` can build whose outputs match the reference's,
    timed in alternating rounds; the fastest by median, with every candidate's measurement."""
    want = reference(example_uint8)
    runners: dict[str, Runner] = {"eager": reference}
    measured = {"eager": Measurement("eager", peak_rel_error=0.0)}
    for name, build in builders.items():
        m = measured[name] = Measurement(name)
        t0 = time.perf_counter()
        try:
            runner = build()
            for _ in range(WARM_CALLS):
                out = runner(example_uint8)
        except Exception as exc:  # unavailable here (not installed, unsupported CPU, compiler missing)
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            m.refused = f"{type(exc).__name__}: {first_line}"
            log.warning("auto runner: %s skipped: %s", name, m.refused)
            continue
        m.build_s = time.perf_counter() - t0
        m.peak_rel_error = peak_relative_error(out, want)
        if not m.peak_rel_error <= PEAK_TOLERANCE:
            m.refused = f"outputs {m.peak_rel_error:.1e} of the peak off eager's"
            log.warning("auto runner: %s refused: %s", name, m.refused)
            continue
        runners[name] = runner
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(ROUNDS):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner(example_uint8)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        measured[name].median_ms = statistics.median(ts) * 1e3
    chosen = min(times, key=lambda n: statistics.median(times[n]))
    choice = AutoChoice(chosen, int(example_uint8.shape[0]), threads, list(measured.values()))
    log.info("%s", choice.summary())
    return runners[chosen], choice
