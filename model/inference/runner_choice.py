"""`auto` on the CPU: measure the candidate runners on this machine, keep the fastest that gives eager's outputs.

Which runner is fastest depends on the CPU (AVX-512, AMX), the thread count, the model size and the batch:
here, for tiny at 640 on 1 thread, inductor, ONNX Runtime and OpenVINO are within 10% of each other and the
order changes from run to run, so the choice is measured rather than assumed.

How, at the batch sizes the Detector is warmed up for (the smallest and the largest of them, e.g. 1 and the
server's max batch; or the first batch it sees when it is not warmed up):
- eager runs first; its outputs are the reference.
- each candidate is built (one ONNX export serves ONNX Runtime and OpenVINO; a runner that cannot be built,
  e.g. its package is not installed, is skipped and says why), run `WARM_CALLS` times, then checked: the
  largest difference from eager on any output, relative to that output's peak, must be <= `PEAK_TOLERANCE`
  (1e-4, float32), else it is refused;
- then, at each size, all candidates are timed in `ROUNDS` alternating rounds of one call each (a shared
  machine's load falls on all of them alike); the median decides that size's winner. Where different runners
  win at different sizes (in the README's table the faster runtime at batch 8 is not always the one at
  batch 1), the Detector runs each batch on the winner of the nearest measured size (`ByBatchSize`).
Cost, bounded by construction: one ONNX export (~10 s for tiny here), one inductor compile (~5-20 s for
tiny), and WARM_CALLS + ROUNDS = 7 forwards per candidate and size: the service's warm-up of tiny at 640, 2 threads,
max batch 8 took 29 s here with inductor's compile cache warm, 48 s cold (eager alone: 0.9 s).
The result (every candidate's median and error) is kept in `AutoChoice` (`Detector.auto_choice`) and logged;
`Detector.describe()['accelerate']` names the runner chosen.

A choice is remembered for the life of the process, keyed by what decides the speed and not by the weights: the
network's layer shapes (size, class count), the batch shapes, the thread count, the candidates, the device and
OpenMP's wait policy. A second network with the same key (a hot-reloaded version of a served model, another
Detector of the same size) reuses it: only the winners are built, and each is still checked against this network's
own eager outputs (the same PEAK_TOLERANCE), then run without timing anyone (`AutoChoice.reused`). A reload then
costs the export and that check rather than 7 forwards of every candidate on a machine busy serving the old
version, and keeps the choice measured when the process started. A winner that no longer builds or matches sends
the network through the full measurement again.

With a choices file (`choose_runner(choices_file=...)`, the service's `RTMDET_AUTO_CHOICES_FILE`), a measurement
also outlives the process: a restart on the same machine reuses it in the same way (model.inference.choice_store).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from model.inference.accelerate import EagerRunner, InductorRunner, Outputs, Runner, fast_eager
from model.inference.choice_store import ChoiceFile
from model.inference.streams import with_streams
from model.inference.winograd import kernel_version, winograd_enabled

log = logging.getLogger("rtmdet.runner")
CANDIDATES = ("eager", "inductor", "onnxruntime", "openvino")
PEAK_TOLERANCE = 1e-4
WARM_CALLS = 2
ROUNDS = 5
PROCESS = "this process"  # AutoChoice.reused_from for a choice made earlier in this process


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
    median_ms: float | None = None  # at the first measured batch size
    peak_rel_error: float | None = None
    refused: str | None = None  # why the candidate was not timed
    median_ms_by_batch: dict[int, float] = field(default_factory=dict)


@dataclass
class AutoChoice:
    chosen: str  # the runner's name, or "a+b" where different runners won at different batch sizes
    batch: int  # the first (smallest) batch size measured
    threads: int
    measurements: list[Measurement] = field(default_factory=list)
    by_batch: dict[int, str] = field(default_factory=dict)  # each measured batch size's winner
    reused: bool = False  # taken from an earlier network with the same speed key (module docstring), not timed
    reused_from: str | None = None  # where a reused choice came from: "this process" or a choices file's path
    measured_at: float | None = None  # when the candidates were timed (Unix time)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoChoice:
        """`to_dict()`'s inverse, for a choice read back from JSON (whose keys are strings)."""
        measurements = [Measurement(**{**m, "median_ms_by_batch": {int(b): float(t) for b, t in
                                                                   m.get("median_ms_by_batch", {}).items()}})
                        for m in d.get("measurements", [])]
        return cls(chosen=str(d["chosen"]), batch=int(d["batch"]), threads=int(d["threads"]),
                   measurements=measurements, by_batch={int(b): str(n) for b, n in d["by_batch"].items()},
                   measured_at=d.get("measured_at"))

    def summary(self) -> str:
        parts = []
        for m in self.measurements:
            if m.median_ms_by_batch:
                times = ", ".join(f"{t:.1f}" for t in m.median_ms_by_batch.values())
                parts.append(f"{m.name} {times} ms")
            else:
                parts.append(f"{m.name} ({m.refused})")
        sizes = "/".join(str(b) for b in self.by_batch) or str(self.batch)
        winners = ", ".join(f"{n} at batch {b}" for b, n in self.by_batch.items())
        how = ""
        if self.reused and self.reused_from == PROCESS:
            how = "reused from an earlier network of the same shapes in this process, "
        elif self.reused:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.measured_at)) if self.measured_at else "?"
            how = f"reused from {self.reused_from} (measured {when}), "
        return (f"auto runner: {self.chosen} ({how}{winners}; medians at batch {sizes}, {self.threads} threads: "
                f"{'; '.join(parts)})")


def nearest_size(sizes: Sequence[int], batch: int) -> int:
    """The measured batch size nearest to `batch` on a log scale (a tie goes to the larger size)."""
    return min(sizes, key=lambda s: (abs(math.log2(s) - math.log2(max(batch, 1))), -s))


class ByBatchSize:
    """Each batch goes to the runner that was fastest at the measured batch size nearest to it (on a log
    scale, a tie going to the larger size): where the fastest runtime changes with the batch (here, e.g. ONNX
    Runtime at batch 1 and OpenVINO at batch 8), each size runs on its own winner."""

    def __init__(self, by_batch: dict[int, Runner]) -> None:
        self.by_batch = dict(sorted(by_batch.items()))

    def runner_for(self, batch: int) -> Runner:
        return self.by_batch[nearest_size(list(self.by_batch), batch)]

    def __call__(self, batch_uint8: torch.Tensor) -> Outputs:
        return self.runner_for(int(batch_uint8.shape[0]))(batch_uint8)

    def close(self) -> None:
        for runner in self.by_batch.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()


def _builders(net: nn.Module, normalize: Callable, example: torch.Tensor, strides: Sequence[int], threads: int,
              candidates: Sequence[str], any_canvas: bool = False) -> dict[str, Callable[[], Runner]]:
    builders: dict[str, Callable[[], Runner]] = {}
    exported: dict[str, object] = {}

    def onnx_runner(mode: str) -> Runner:
        # One export for both runtimes; each reads the file when built, so both are built inside the context.
        from model.inference.onnx_runners import build_onnx_runner, export_network

        if not exported:
            wanted = [m for m in ("onnxruntime", "openvino") if m in candidates]
            try:
                with export_network(net, strides, int(example.shape[1]), any_canvas) as path:
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
            builders[name] = lambda: with_streams(InductorRunner(net, normalize), threads)
        elif name in ("onnxruntime", "openvino"):
            builders[name] = lambda name=name: onnx_runner(name)
        elif name != "eager":
            raise ValueError(f"unknown auto candidate {name!r}; choose from {CANDIDATES}")
    return builders


def _built_and_checked(build: Callable[[], Runner], examples: Sequence[torch.Tensor],
                       wants: Sequence[Outputs]) -> tuple[Runner, float]:
    """`build()`, called WARM_CALLS times at each example (the first call of a shape may compile it), and its
    worst peak-relative error against `wants` (the reference's outputs, one per example)."""
    runner, worst = build(), 0.0
    for x, want in zip(examples, wants, strict=True):
        for _ in range(WARM_CALLS):
            out = runner(x)
        worst = max(worst, peak_relative_error(out, want))
    return runner, worst


def _dispatch(winners: dict[int, str], runners: dict[str, Runner]) -> tuple[Runner, str]:
    """The runner that serves `winners` (batch size -> name): the one winner itself, else a ByBatchSize; and the
    choice's name ("a" or "a+b", each winner once in batch order)."""
    names = list(dict.fromkeys(winners.values()))
    if len(names) == 1:
        return runners[names[0]], names[0]
    return ByBatchSize({b: runners[n] for b, n in winners.items()}), "+".join(names)


TORCH_STREAMS = "torch-streams"
_CHOICES: dict[tuple, AutoChoice] = {}  # this process's choices by speed key (module docstring)
_CHOICES_LOCK = threading.Lock()


def speed_key(net: nn.Module, examples: Sequence[torch.Tensor], threads: int, candidates: Sequence[str]) -> tuple:
    """What decides which runner is fastest, the weights' values left out."""
    shapes = repr([(k, tuple(v.shape), str(v.dtype), str(v.device)) for k, v in net.state_dict().items()])
    # TORCH_STREAMS, winograd: choices measured before the torch engines ran over streams, or before they ran
    # the Winograd convolutions, with them switched off, or with another version of their kernel, are measured
    # again.
    winograd = f"winograd={kernel_version()}" if winograd_enabled() else "winograd=0"
    return (hashlib.sha256(shapes.encode()).hexdigest(), tuple(sorted(tuple(x.shape) for x in examples)),
            str(examples[0].dtype), threads, tuple(candidates), os.environ.get("OMP_WAIT_POLICY"), TORCH_STREAMS,
            winograd)


def forget_choices() -> None:
    """Drop this process's remembered choices (the next `auto` measures again)."""
    with _CHOICES_LOCK:
        _CHOICES.clear()


def choose_runner(net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                  examples: torch.Tensor | Sequence[torch.Tensor], strides: Sequence[int], threads: int | None = None,
                  candidates: Sequence[str] = CANDIDATES,
                  choices_file: str | Path | ChoiceFile | None = None,
                  any_canvas: bool = False) -> tuple[Runner, AutoChoice]:
    """Measure `candidates` on `examples` (uint8 batches of the serving shape, one per batch size to decide;
    normally the smallest and the largest the server runs) and return the fastest runner whose outputs are
    within PEAK_TOLERANCE of eager's, per batch size, with the measurements; or, when this process (or, with
    `choices_file`, an earlier process on this machine: model.inference.choice_store) already chose for a
    network of the same speed key, that choice's winners, checked against this network's eager. A new
    measurement is saved to `choices_file`. `any_canvas`: the runtimes' export takes any height and width (the
    `tight` canvas)."""
    examples = [examples] if isinstance(examples, torch.Tensor) else list(examples)
    threads = threads or torch.get_num_threads()
    key = speed_key(net, examples, threads, candidates)
    store = ChoiceFile.of(choices_file)
    with _CHOICES_LOCK:
        earlier, source = _CHOICES.get(key), PROCESS
    if earlier is None and store is not None:
        earlier, source = _saved_choice(store, key), str(store.path)
    if earlier is not None:
        reused = reuse_choice(earlier, net, normalize, examples, strides, threads, source, any_canvas)
        if reused is not None:
            with _CHOICES_LOCK:
                _CHOICES.setdefault(key, reused[1])
            return reused
    builders = _builders(net, normalize, examples[0], strides, threads, candidates, any_canvas)
    runner, choice = pick_fastest(EagerRunner(net, normalize), builders, examples, threads)
    with _CHOICES_LOCK:
        _CHOICES[key] = choice
    if store is not None:
        store.save(key, choice.to_dict())
    return runner, choice


def _saved_choice(store: ChoiceFile, key: tuple) -> AutoChoice | None:
    saved = store.load(key)
    if saved is None:
        return None
    try:
        return AutoChoice.from_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or foreign entry
        log.warning("auto runner: the entry in %s for these shapes is malformed (%s: %s); measuring again",
                    store.path, type(exc).__name__, exc)
        return None


def reuse_choice(earlier: AutoChoice, net: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                 examples: Sequence[torch.Tensor], strides: Sequence[int], threads: int,
                 source: str = PROCESS, any_canvas: bool = False) -> tuple[Runner, AutoChoice] | None:
    """`earlier`'s winners built for `net` and checked against its eager outputs at every example; None (and a
    warning) if one does not build or does not match, so that the caller measures afresh."""
    reference = EagerRunner(net, normalize)
    wants = [reference(x) for x in examples]
    winners = [n for n in dict.fromkeys(earlier.by_batch.values()) if n != "eager"]
    runners: dict[str, Runner] = {"eager": with_streams(fast_eager(reference), threads)
                                  if "eager" in earlier.by_batch.values() else reference}
    errors: dict[str, float] = {"eager": 0.0}
    try:
        for name, build in _builders(net, normalize, examples[0], strides, threads, winners, any_canvas).items():
            runners[name], errors[name] = _built_and_checked(build, examples, wants)
            if not errors[name] <= PEAK_TOLERANCE:
                raise ValueError(f"outputs {errors[name]:.1e} of the peak off eager's")
    except Exception as exc:
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("auto runner: the earlier choice %s (from %s) does not hold for this network (%s); measuring "
                    "again", earlier.chosen, source, first_line)
        return None
    chosen, _ = _dispatch(earlier.by_batch, runners)
    measurements = [replace(m, peak_rel_error=errors.get(m.name, m.peak_rel_error)) for m in earlier.measurements]
    choice = replace(earlier, measurements=measurements, by_batch=dict(earlier.by_batch), reused=True,
                     reused_from=source)
    log.info("%s", choice.summary())
    return chosen, choice


def pick_fastest(reference: Runner, builders: dict[str, Callable[[], Runner]],
                 examples: torch.Tensor | Sequence[torch.Tensor], threads: int) -> tuple[Runner, AutoChoice]:
    """`reference` (named eager) and every runner `builders` can build whose outputs match the reference's
    (checked at each example's batch size), timed in alternating rounds at each size; per size the fastest by
    median. One runner when one won everywhere, else a `ByBatchSize` over the winners."""
    examples = sorted([examples] if isinstance(examples, torch.Tensor) else list(examples),
                      key=lambda x: int(x.shape[0]))
    wants = [reference(x) for x in examples]
    # Eager as it runs when it wins: Winograd on the CPU, over one-thread streams with 2+ threads
    # (model.inference.streams); checked against the reference like every other candidate.
    eager = with_streams(fast_eager(reference), threads) if isinstance(reference, EagerRunner) else reference
    runners: dict[str, Runner] = {"eager": eager}
    measured = {"eager": Measurement("eager", peak_rel_error=max(peak_relative_error(eager(x), want)
                                                                 for x, want in zip(examples, wants)))}
    for name, build in builders.items():
        m = measured[name] = Measurement(name)
        t0 = time.perf_counter()
        try:
            runner, m.peak_rel_error = _built_and_checked(build, examples, wants)
        except Exception as exc:  # unavailable here (not installed, unsupported CPU, compiler missing)
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            m.refused = f"{type(exc).__name__}: {first_line}"
            log.warning("auto runner: %s skipped: %s", name, m.refused)
            continue
        m.build_s = time.perf_counter() - t0
        if not m.peak_rel_error <= PEAK_TOLERANCE:
            m.refused = f"outputs {m.peak_rel_error:.1e} of the peak off eager's"
            log.warning("auto runner: %s refused: %s", name, m.refused)
            continue
        runners[name] = runner
    winners: dict[int, str] = {}
    for x in examples:
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(ROUNDS):
            for name, runner in runners.items():
                t0 = time.perf_counter()
                runner(x)
                times[name].append(time.perf_counter() - t0)
        batch = int(x.shape[0])
        for name, ts in times.items():
            measured[name].median_ms_by_batch[batch] = statistics.median(ts) * 1e3
        winners[batch] = min(times, key=lambda n: statistics.median(times[n]))
    for m in measured.values():
        if m.median_ms_by_batch:
            m.median_ms = next(iter(m.median_ms_by_batch.values()))
    chosen, name = _dispatch(winners, runners)
    choice = AutoChoice(name, int(examples[0].shape[0]), threads, list(measured.values()), winners,
                        measured_at=time.time())
    log.info("%s", choice.summary())
    return chosen, choice
