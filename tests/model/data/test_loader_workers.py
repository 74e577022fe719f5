"""Data-loader workers never inherit a lock from the trainer's threads (issue 12), and a stalled worker ends the
run with an error that names it instead of hanging it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.data.loader import DataLoaderStalled, batches, build_train_loader, forkserver_pid
from model.data.sample import Sample

STRESS = Path(__file__).with_name("fork_stress.py")
REPO = Path(__file__).resolve().parents[3]


def _run_stress(starts: int, timeout_s: float) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        out = subprocess.run([sys.executable, str(STRESS), str(starts), "60"], capture_output=True, text=True,
                             timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode().strip().splitlines() if isinstance(e.stdout, bytes) else \
            (e.stdout or "").strip().splitlines()
        pytest.fail(f"a loader start hung: {len(done)} of {starts} starts returned within {timeout_s:.0f} s")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_two_hundred_loader_starts_after_opencv_work_never_hang():
    # With forked workers this hung within a few dozen starts (a worker blocked in cv2.setNumThreads on a lock
    # copied from the parent's OpenCV pool). A forkserver start costs ~0.15 s here; 200 take well under 2 min.
    lines = _run_stress(200, timeout_s=240)
    assert len(lines) == 200 and lines[-1].startswith("start 200 ")


@pytest.mark.slow
def test_a_thousand_loader_starts_never_hang():
    lines = _run_stress(1000, timeout_s=900)
    assert len(lines) == 1000


def _samples(n=8):
    rng = np.random.default_rng(1)
    return [Sample(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), np.array([[5, 5, 40, 40]], np.float32),
                   np.array([0], np.int64), i) for i in range(n)]


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_workers_are_forked_from_a_single_threaded_server_not_from_the_trainer():
    cv2.GaussianBlur(np.zeros((800, 800, 3), np.uint8), (9, 9), 0)  # this process has OpenCV's threads now
    loader = build_train_loader(_samples(), "tiny", 64, 4, workers=2, stage=1, distributed=False, seed=0)
    it = iter(loader)
    next(it)
    server = forkserver_pid()
    assert server is not None and server != os.getpid()
    # What makes a fork safe: the process forked has one thread, so no lock it copies can be held by another.
    assert _threads(server) == 1
    assert _threads(os.getpid()) > 1  # ... unlike this one, which forking would copy locks from
    pids = [w.pid for w in it._workers]
    assert len(pids) == 2 and all(_parent(pid) == server for pid in pids)
    del it, loader


class SlowDataset:
    """Items take `delay_s` each: a stand-in for a stuck worker (importable, so a worker can unpickle it)."""

    def __init__(self, samples, delay_s):
        self.samples, self.delay_s = samples, delay_s

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return self.samples[i]


def test_a_stalled_worker_is_an_error_naming_the_stage_and_worker():
    loader = build_train_loader(SlowDataset(_samples(), 30.0), "tiny", 64, 4, workers=1, stage=2,
                                distributed=False, seed=0, timeout_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(DataLoaderStalled, match=r"stage-2 data loader: worker 0 \(pid \d+\) sent no batch in 1 s"):
        next(batches(loader, stage=2))
    assert time.perf_counter() - t0 < 20  # worker start (~1 s) plus the 1 s timeout, not the 30 s item
    del loader
