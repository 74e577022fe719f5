"""The torch engines over one-thread streams (model.inference.streams): the same outputs in batch order, the
chunks really run at once on one thread each, and the process's thread count is left as it was."""
import threading
import time

import pytest
import torch

from model import build_rtmdet
from model.inference.accelerate import EagerRunner, build_runner
from model.inference.preprocess import Normalizer
from model.inference.runner_choice import PEAK_TOLERANCE, peak_relative_error
from model.inference.streams import TorchStreams, chunk_sizes, filled_stream_slices
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic

SIZE = 96


@pytest.fixture(scope="module")
def eager():
    m = fill_deterministic(build_rtmdet("tiny", num_classes=3), 3)
    net = fused_for_inference(m).to(memory_format=torch.channels_last)
    return EagerRunner(net, Normalizer(torch.device("cpu"), channels_last=True))


def batch(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)


def test_a_batch_is_cut_evenly_over_the_streams():
    assert chunk_sizes(8, 2) == [4, 4] and chunk_sizes(7, 2) == [4, 3] and chunk_sizes(1, 2) == [1]
    assert chunk_sizes(2, 4) == [1, 1] and chunk_sizes(9, 4) == [3, 2, 2, 2] and chunk_sizes(5, 1) == [5]
    # Fixed-thread sessions: over the streams only once there is an image for each.
    assert filled_stream_slices(3, 4) == [slice(0, 3)] and filled_stream_slices(1, 2) == [slice(0, 1)]
    assert filled_stream_slices(2, 2) == [slice(0, 1), slice(1, 2)]
    assert filled_stream_slices(6, 4) == [slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 6)]


def test_streams_give_eager_outputs_in_batch_order(eager):
    streams = TorchStreams(eager, threads=2)
    try:
        for n in (1, 2, 5, 5):  # 5: chunks of 3 and 2, run one after the other the first time, at once after
            x = batch(n, seed=n)
            want, got = eager(x), streams(x)
            assert [g.shape[0] for g in got[0] + got[1]] == [n] * 6
            assert peak_relative_error(got, want) <= PEAK_TOLERANCE
            # Each image keeps its own outputs: the last one run alone gives what it gave inside the batch.
            alone = eager(x[-1:].clone())
            assert peak_relative_error([[c[-1:] for c in got[0]], [r[-1:] for r in got[1]]], alone) <= 1e-5
    finally:
        streams.close()


class Recording:
    """An engine that notes each chunk's size and thread count, and, once armed, waits for the other chunk of
    its batch: chunks run one after the other would break the barrier (its timeout) instead of passing it."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.barrier = inner, [], None
        self.lock = threading.Lock()
        self.inside = self.most_inside = 0

    def __call__(self, x):
        with self.lock:
            self.calls.append((int(x.shape[0]), torch.get_num_threads(), threading.current_thread().name))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            else:
                time.sleep(0.05)  # long enough for a second chunk to come in, if it were sent at once
            return self.inner(x)
        finally:
            with self.lock:
                self.inside -= 1


def test_chunks_run_at_once_on_one_thread_each_and_a_batch_of_one_on_the_callers_threads(eager):
    torch.set_num_threads(2)
    engine = Recording(eager)
    streams = TorchStreams(engine, threads=2)
    try:
        streams(batch(4, seed=1))  # a new chunk size (an inductor compile): one chunk after the other
        assert [(n, t) for n, t, _ in engine.calls] == [(2, 1), (2, 1)] and engine.most_inside == 1
        engine.calls.clear()
        engine.barrier = threading.Barrier(2)
        streams(batch(4, seed=2))  # both chunks must be inside the engine at once to pass
        assert sorted((n, t) for n, t, _ in engine.calls) == [(2, 1), (2, 1)]
        assert len({name for _, _, name in engine.calls}) == 2
        engine.barrier = None
        engine.calls.clear()
        streams(batch(1, seed=3))
        assert engine.calls == [(1, 2, threading.current_thread().name)]
    finally:
        streams.close()


def test_the_process_thread_count_is_left_as_it_was(eager):
    """A worker's set_num_threads also sets torch's process-wide count, which a thread started later takes at its
    first parallel call (the service's model thread): it must come back to the runner's."""
    torch.set_num_threads(2)
    streams = TorchStreams(eager, threads=2)
    try:
        streams(batch(4, seed=5))
        streams(batch(4, seed=6))
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join(timeout=10)
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        streams.close()


def test_fewer_chunks_than_threads_share_the_threads_out(eager):
    """Four threads, a batch of two: two chunks of two threads each (not two threads idle); a batch of four: four
    chunks of one thread."""
    engine = Recording(eager)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    streams = TorchStreams(engine, threads=4)
    try:
        streams(batch(2, seed=7))
        assert sorted((n, t) for n, t, _ in engine.calls) == [(1, 2), (1, 2)]
        engine.calls.clear()
        streams(batch(4, seed=8))
        assert sorted((n, t) for n, t, _ in engine.calls) == [(1, 1)] * 4
        assert torch.get_num_threads() == 4
    finally:
        streams.close()
        torch.set_num_threads(before)


def test_build_runner_streams_eager_on_two_threads_only(eager):
    x = batch(2, seed=4)
    two = build_runner("eager", eager.net, eager.normalize, x, (8, 16, 32), threads=2)
    one = build_runner("eager", eager.net, eager.normalize, x, (8, 16, 32), threads=1)
    try:
        assert isinstance(two, TorchStreams) and two.streams == 2 and two.name == "eager"
        assert isinstance(one, EagerRunner)
    finally:
        two.close()
