"""The CPU runners give eager's raw head outputs (relative to each output's peak, float32), and `auto` keeps
the fastest runner that does, refusing one that does not and skipping one that cannot be built."""
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch

from model import Detector, TestConfig, build_rtmdet
from model.inference.accelerate import EagerRunner, InductorRunner
from model.inference.onnx_runners import OnnxRuntimeRunner, OpenVINORunner, export_network
from model.inference.preprocess import Normalizer
from model.inference.runner_choice import (
    _CHOICES,
    PEAK_TOLERANCE,
    AutoChoice,
    choose_runner,
    peak_relative_error,
    pick_fastest,
    speed_key,
)
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic
from tests.model.test_accelerate import PHOTOS, assert_same_detections_any_order, confident_model

SIZE = 96


@pytest.fixture(scope="module")
def net():
    m = fill_deterministic(build_rtmdet("tiny", num_classes=3), 3)
    with torch.no_grad():
        for conv in m.bbox_head.rtm_cls:
            conv.weight.mul_(30.0)  # logits of a real detector's spread, so the error figure means something
    return fused_for_inference(m).to(memory_format=torch.channels_last), m.bbox_head.strides


@pytest.fixture(scope="module")
def onnx_runners(net):
    """One export (the slow part, ~10 s here) for every test of the two runtimes; any canvas (the tight one's)."""
    network, strides = net
    with export_network(network, strides, SIZE, any_canvas=True) as path:
        return OnnxRuntimeRunner(path, threads=1), OpenVINORunner(path, threads=1)


def batches(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (b, SIZE, SIZE, 3), dtype=torch.uint8, generator=g) for b in sizes]


def test_onnx_runtime_and_openvino_runners_take_any_canvas_the_tight_letterbox_makes(net, onnx_runners):
    """The runners' export has a symbolic height and width: tight canvases (any multiples of 32, either
    orientation, other than the exported square) give eager's outputs, maps of the canvas's shape."""
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    g = torch.Generator().manual_seed(3)
    for shape in [(1, SIZE - 32, SIZE), (2, SIZE, SIZE - 64), (1, SIZE + 64, SIZE)]:
        x = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=g)
        want = eager(x)
        assert [tuple(w.shape[2:]) for w in want[0]] == [(shape[1] // s, shape[2] // s) for s in (8, 16, 32)]
        for runner in onnx_runners:
            got = runner(x)
            assert [t.shape for t in got[0] + got[1]] == [t.shape for t in want[0] + want[1]], runner.name
            assert 0 < peak_relative_error(got, want) <= PEAK_TOLERANCE, runner.name


def test_onnx_runtime_and_openvino_runners_give_eager_outputs_at_any_batch(net, onnx_runners):
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    for x in batches(1, 3):  # 3: neither the exported example's batch (2) nor one seen before
        want = eager(x)
        assert [w.shape[0] for w in want[0]] == [x.shape[0]] * 3
        for runner in onnx_runners:
            got = runner(x)
            assert 0 < peak_relative_error(got, want) <= PEAK_TOLERANCE, runner.name
            assert all(g.dtype == torch.float32 for g in got[0] + got[1])


@pytest.fixture(scope="module")
def exported(net):
    """The streams tests' runners, all read from one export: two threads (a batch of two or more is cut into two
    chunks run at once, one core each), and four (4 one-thread streams, and 2 of two threads for ONNX Runtime)."""
    network, strides = net
    with export_network(network, strides, SIZE) as path:
        yield {"two": (OnnxRuntimeRunner(path, threads=2), OpenVINORunner(path, threads=2)),
               "four": (OnnxRuntimeRunner(path, threads=4), OpenVINORunner(path, threads=4)),
               "four_by_two": OnnxRuntimeRunner(path, threads=4, streams=2), "path": path}


@pytest.fixture(scope="module")
def stream_runners(exported):
    return exported["two"]


def test_streams_give_eager_outputs_in_batch_order(net, stream_runners):
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    ort, ov = stream_runners
    assert len(ort.stream_sessions) == 2 and ov.streams == 2
    for x in batches(1, 2, 5, seed=7):  # 1: one session, all threads; 2 and 5 ([3, 2]): two streams
        want = eager(x)
        for runner in stream_runners:
            got = runner(x)
            assert [g.shape[0] for g in got[0] + got[1]] == [x.shape[0]] * 6, runner.name
            assert 0 < peak_relative_error(got, want) <= PEAK_TOLERANCE, (runner.name, x.shape[0])
            # Each image keeps its own outputs: the last one run alone gives what it gave inside the batch.
            alone = runner(x[-1:].clone())
            assert peak_relative_error([[c[-1:] for c in got[0]], [r[-1:] for r in got[1]]], alone) <= 1e-5
    modes = {mode for mode, _ in ov.compiled}
    assert modes == {"latency", "streams"}  # batch 1 on the latency model, bigger batches on the streams one


class Recorded:
    """A session that still runs, and counts the images each call of it was given."""

    def __init__(self, session) -> None:
        self.session, self.images = session, []

    def run(self, names, feed):
        self.images.append(len(next(iter(feed.values()))))
        return self.session.run(names, feed)


def test_a_batch_short_of_the_streams_runs_whole_on_all_the_threads(net, exported):
    """A runtime's session has a fixed thread count: four one-thread streams would run a batch of two on two of
    four cores, so a batch with fewer images than streams runs whole on the session with every thread."""
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    ort, ov = exported["four"]
    assert ort.session.get_session_options().intra_op_num_threads == 4
    assert [s.get_session_options().intra_op_num_threads for s in ort.stream_sessions] == [1] * 4
    ort.session = Recorded(ort.session)
    ort.stream_sessions = [Recorded(s) for s in ort.stream_sessions]
    for x in batches(2, 3, 4, 6, seed=3):
        want = eager(x)
        for runner in (ort, ov):
            assert 0 < peak_relative_error(runner(x), want) <= PEAK_TOLERANCE, (runner.name, x.shape[0])
    assert ort.session.images == [2, 3]
    assert [s.images for s in ort.stream_sessions] == [[1, 2], [1, 2], [1, 1], [1, 1]]
    assert sorted((mode, shape[0]) for mode, shape in ov.compiled) == [
        ("latency", 2), ("latency", 3), ("streams", 1), ("streams", 2)]
    # Fewer streams than threads: each stream's session has its share of them.
    by_two = exported["four_by_two"]
    assert [s.get_session_options().intra_op_num_threads for s in by_two.stream_sessions] == [2, 2]
    (x,) = batches(3, seed=4)
    assert 0 < peak_relative_error(by_two(x), eager(x)) <= PEAK_TOLERANCE


def test_openvino_answers_from_a_new_thread(onnx_runners):
    """The service's watchdog may start a new batcher thread: each thread gets its own infer request."""
    import threading

    runner = onnx_runners[1]
    (x,) = batches(2, seed=1)
    first = runner(x)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("o", runner(x)))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and peak_relative_error(out["o"], first) == 0.0


@pytest.mark.slow  # the compile takes 30-90 s on two shared cores
def test_inductor_runner_gives_eager_outputs(net):
    network, strides = net
    normalize = Normalizer(torch.device("cpu"), channels_last=True)
    eager, compiled = EagerRunner(network, normalize), InductorRunner(network, normalize)
    (x,) = batches(1, seed=2)
    with torch.inference_mode():  # as Detector.forward calls it
        got = compiled(x)
    assert 0 <= peak_relative_error(got, eager(x)) <= PEAK_TOLERANCE
    # Frozen: the weights are constants, packed once for oneDNN with bias and SiLU fused in; unfrozen, every
    # call runs aten.convolution on weights passed in (what `options={"freezing": True}` alone gave).
    with torch.profiler.profile() as prof, torch.inference_mode():
        compiled(x)
    ops = {e.name for e in prof.events()}
    assert "mkldnn::_convolution_pointwise" in ops and "aten::convolution" not in ops, sorted(ops)
    # The wide 3x3 convolutions run as Winograd F(4x4, 3x3): its fused kernel is in the compiled graph.
    assert compiled.winograd_convs == 23 and "rtmdet::winograd_conv" in ops, sorted(ops)


class Slowed:
    """A right runner made slower by a known sleep: the choice must be by time."""

    def __init__(self, runner, seconds):
        self.runner, self.seconds = runner, seconds

    def __call__(self, x):
        time.sleep(self.seconds)
        return self.runner(x)


def test_auto_keeps_the_fastest_runner_that_matches_and_says_why_others_lost(net):
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    (x,) = batches(1, seed=3)

    def off_by_a_percent(x):
        cls, reg = eager(x)
        return [c * 1.01 for c in cls], reg

    def cannot_build():
        raise ImportError("no module named fastruntime")

    slowed_eager = Slowed(eager, 0.05)
    runner, choice = pick_fastest(slowed_eager, {"wrong": lambda: off_by_a_percent, "missing": cannot_build,
                                                 "right": lambda: eager}, x, threads=1)
    assert runner is eager and choice.chosen == "right"
    by_name = {m.name: m for m in choice.measurements}
    assert by_name["eager"].median_ms >= 50 and by_name["right"].median_ms < by_name["eager"].median_ms
    assert by_name["wrong"].median_ms is None and "of the peak off" in by_name["wrong"].refused
    assert by_name["missing"].refused.startswith("ImportError: no module named fastruntime")
    assert "auto runner: right" in choice.summary()


class SlowAt:
    """A right runner made slower by a known sleep at one batch size only."""

    def __init__(self, runner, batch, seconds):
        self.runner, self.batch, self.seconds = runner, batch, seconds
        self.calls = []

    def __call__(self, x):
        self.calls.append(int(x.shape[0]))
        if x.shape[0] == self.batch:
            time.sleep(self.seconds)
        return self.runner(x)


def test_auto_runs_each_batch_size_on_the_runner_that_was_fastest_at_the_nearest_measured_size(net):
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    x1, x8 = batches(1, 8, seed=4)
    slow_at_1, slow_at_8 = SlowAt(eager, 1, 0.2), SlowAt(eager, 8, 0.2)
    runner, choice = pick_fastest(Slowed(eager, 0.1), {"fast_at_8": lambda: slow_at_1, "fast_at_1": lambda: slow_at_8},
                                  [x8, x1], threads=1)
    assert choice.by_batch == {1: "fast_at_1", 8: "fast_at_8"} and choice.batch == 1
    assert choice.chosen == "fast_at_1+fast_at_8"
    by_name = {m.name: m for m in choice.measurements}
    assert by_name["fast_at_1"].median_ms_by_batch[8] >= 200 > by_name["fast_at_1"].median_ms_by_batch[1]
    for batch, expected in [(1, slow_at_8), (2, slow_at_8), (3, slow_at_1), (8, slow_at_1), (16, slow_at_1)]:
        slow_at_1.calls.clear()
        slow_at_8.calls.clear()
        (x,) = batches(batch, seed=5)
        got = runner(x)
        assert expected.calls == [batch], (batch, slow_at_1.calls, slow_at_8.calls)
        assert peak_relative_error(got, eager(x)) == 0.0


def test_auto_with_one_winner_everywhere_returns_that_runner_itself(net):
    network, _ = net
    eager = EagerRunner(network, Normalizer(torch.device("cpu"), channels_last=True))
    x1, x4 = batches(1, 4, seed=6)
    runner, choice = pick_fastest(Slowed(eager, 0.1), {"right": lambda: eager}, [x1, x4], threads=1)
    assert runner is eager and choice.chosen == "right" and choice.by_batch == {1: "right", 4: "right"}


def test_detector_auto_picks_a_measured_runner_and_keeps_the_eager_detections():
    model = confident_model()
    imgs = [cv2.imread(str(p)) for p in PHOTOS]
    cfg = TestConfig(input_size=160, score_thr=0.3)
    eager = Detector(model, ["a", "b", "c"], device="cpu", test_cfg=cfg)
    auto = Detector(model, ["a", "b", "c"], device="cpu", test_cfg=cfg, accelerate="auto",
                    auto_candidates=("eager", "onnxruntime", "openvino"))  # inductor: its own test, compile is slow
    auto.warmup([1, 2, 4])
    choice = auto.auto_choice
    assert choice is not None and choice.batch == 1 and sorted(choice.by_batch) == [1, 4]  # smallest, largest
    assert [m.name for m in choice.measurements] == ["eager", "onnxruntime", "openvino"]
    assert all(m.peak_rel_error <= PEAK_TOLERANCE and sorted(m.median_ms_by_batch) == [1, 4]
               and min(m.median_ms_by_batch.values()) > 0 for m in choice.measurements)
    for b, winner in choice.by_batch.items():
        assert winner == min(choice.measurements, key=lambda m: m.median_ms_by_batch[b]).name
    assert auto.describe()["accelerate"] == choice.chosen == "+".join(dict.fromkeys(choice.by_batch.values()))
    for e, a in zip(eager(imgs), auto(imgs), strict=True):
        assert len(e) > 0 and len(e) == len(a)
        assert_same_detections_any_order(e, a, atol_score=1e-5, atol_box=1e-2)


def seeded_network(seed: int):
    m = fill_deterministic(build_rtmdet("tiny", num_classes=3), seed)
    with torch.no_grad():
        for conv in m.bbox_head.rtm_cls:
            conv.weight.mul_(30.0)
    return fused_for_inference(m).to(memory_format=torch.channels_last), m.bbox_head.strides


def test_a_network_of_the_same_shapes_reuses_the_choice_checked_against_its_own_eager():
    # A hot-reloaded version: same architecture and shapes, other weights. Its runner is built from the first
    # choice's winners for *its* weights, and nothing is timed again.
    (first, strides), (second, _) = seeded_network(3), seeded_network(4)
    normalize = Normalizer(torch.device("cpu"), channels_last=True)
    x1, x2 = batches(1, 2, seed=9)
    _, measured = choose_runner(first, normalize, [x1, x2], strides, threads=1, candidates=("eager", "onnxruntime"))
    assert not measured.reused and all(m.median_ms_by_batch for m in measured.measurements)
    runner, reused = choose_runner(second, normalize, [x1, x2], strides, threads=1,
                                   candidates=("eager", "onnxruntime"))
    assert reused.reused and reused.by_batch == measured.by_batch and reused.chosen == measured.chosen
    assert "reused from an earlier network" in reused.summary()
    for x in (x1, x2):
        mine, theirs = EagerRunner(second, normalize)(x), EagerRunner(first, normalize)(x)
        assert peak_relative_error(runner(x), mine) <= PEAK_TOLERANCE
        assert peak_relative_error(runner(x), theirs) > 1e-2  # it runs the new weights, not the old ones
    winners = {m.name: m for m in reused.measurements if m.name in reused.by_batch.values()}
    assert all(m.peak_rel_error <= PEAK_TOLERANCE for m in winners.values())


def test_other_shapes_or_threads_are_measured_afresh():
    network, strides = seeded_network(3)
    normalize = Normalizer(torch.device("cpu"), channels_last=True)
    (x1,) = batches(1, seed=9)
    choose_runner(network, normalize, [x1], strides, threads=1, candidates=("eager", "onnxruntime"))
    other_size = torch.zeros((1, 64, 64, 3), dtype=torch.uint8)
    assert speed_key(network, [other_size], 1, ("eager", "onnxruntime")) != \
        speed_key(network, [x1], 1, ("eager", "onnxruntime"))
    # Another thread count is another key: the store is looked up by key only (a third measurement, 6 s, is not
    # needed to show a new key measures afresh: the other size below does).
    assert speed_key(network, [x1], 2, ("eager", "onnxruntime")) != \
        speed_key(network, [x1], 1, ("eager", "onnxruntime"))
    _, choice = choose_runner(network, normalize, [other_size], strides, threads=1,
                              candidates=("eager", "onnxruntime"))
    assert not choice.reused


def test_an_earlier_choice_that_no_longer_builds_is_measured_again():
    network, strides = seeded_network(3)
    normalize = Normalizer(torch.device("cpu"), channels_last=True)
    (x1,) = batches(1, seed=9)
    candidates = ("eager", "onnxruntime")
    _CHOICES[speed_key(network, [x1], 1, candidates)] = AutoChoice("gone", 1, 1, [], {1: "gone"})
    runner, choice = choose_runner(network, normalize, [x1], strides, threads=1, candidates=candidates)
    assert not choice.reused and choice.chosen in candidates
    assert peak_relative_error(runner(x1), EagerRunner(network, normalize)(x1)) <= PEAK_TOLERANCE


SIGNAL_AFTER_RUNNERS_GO = """
import faulthandler, gc, os, signal, sys
import torch
from model.inference.onnx_runners import OpenVINORunner
faulthandler.enable()  # as pytest does: the main thread has a signal stack of its own
first, second = OpenVINORunner(sys.argv[1], threads=1), OpenVINORunner(sys.argv[1], threads=1)
x = torch.zeros(1, 96, 96, 3, dtype=torch.uint8)
first(x), second(x)
del first; gc.collect()  # freed in the order they were made, not the reverse
del second; gc.collect()
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(True))
os.kill(os.getpid(), signal.SIGUSR1)
print("handled" if got else "not handled")
"""


def test_a_signal_after_openvino_runners_are_gone_is_handled_not_a_crash(exported):
    """Each OpenVINO Core's CPU plugin gave the compiling thread its own signal stack and freed it when destroyed.
    With a Core per runner, two runners freed in creation order left the main thread's signal stack pointing at
    freed memory, and the next Python signal handler killed the process with SIGSEGV (the test suite died this
    way when a child process exited). A fresh process, since the state is the process's."""
    out = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_RUNNERS_GO, str(exported["path"])], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "handled", (out.returncode, out.stderr[-2000:])
