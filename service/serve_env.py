"""The process environment `rtmdet serve` runs in on a shared machine: OpenMP's wait policy, torch's and
OpenCV's thread counts.

OpenMP reads `OMP_WAIT_POLICY` once, when its runtime loads (with torch), so it has to be in the environment
before torch is imported. `python -m service serve` sets it in `service/__main__.py` before any import; the
`rtmdet` console script sets it once it knows the command is `serve`, which is still before torch (the command
line, the settings and the `model` package's names load no torch: `model/__init__.py`). A caller that did import
torch first gets a re-exec (exec, not fork: nothing of the first process survives) with the variable set. A
value the operator set is kept. Why PASSIVE is the default: see docs/service.md ("Threads on a shared machine"),
measured with bench/bench_service.py.

This module imports nothing heavy, so `__main__` can use it before torch.
"""
from __future__ import annotations

import logging
import os
import sys

DEFAULT_WAIT_POLICY = "PASSIVE"  # idle OpenMP workers sleep instead of spinning on the cores the service shares
REEXEC_MARK = "RTMDET_SERVE_ENV_SET"

log = logging.getLogger("rtmdet.serve")


def wait_policy_missing(env: os._Environ | dict) -> bool:
    return "OMP_WAIT_POLICY" not in env


_in_place_before_torch = False  # whether OpenMP, when it loaded in this process, saw OMP_WAIT_POLICY


def set_wait_policy(env: os._Environ | dict) -> None:
    """OMP_WAIT_POLICY from RTMDET_OMP_WAIT_POLICY (default PASSIVE), unless the operator set OMP_WAIT_POLICY."""
    global _in_place_before_torch
    if wait_policy_missing(env):
        env["OMP_WAIT_POLICY"] = env.get("RTMDET_OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
    _in_place_before_torch = _in_place_before_torch or "torch" not in sys.modules


def ensure_before_torch() -> None:
    """For `serve`: the wait policy in place before OpenMP starts; re-exec as `python -m service` with the same
    arguments if torch (and so OpenMP) was already imported in this process without it."""
    global _in_place_before_torch
    if not wait_policy_missing(os.environ):
        _in_place_before_torch = True  # the operator's, in the environment the process started with
        return
    set_wait_policy(os.environ)
    if "torch" not in sys.modules:
        return
    if sys.argv[1:2] != ["serve"] or os.environ.get(REEXEC_MARK):  # called as a library, or already re-executed
        log.warning("OMP_WAIT_POLICY was not set before torch loaded; OpenMP keeps its default policy")
        return
    os.environ[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "service", *sys.argv[1:]])


def apply_thread_counts(torch_threads: int, opencv_threads: int) -> str:
    """torch intra-op threads (0: one per core) and OpenCV's own pool (decoding already runs on the service's
    decode threads, one image each; OpenCV splitting each image again would oversubscribe the cores)."""
    import cv2
    import torch

    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    cv2.setNumThreads(opencv_threads)
    when = "before OpenMP loaded" if _in_place_before_torch else "after OpenMP loaded: not in effect"
    return (f"threads: torch {torch.get_num_threads()}, OpenCV {opencv_threads}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(OpenMP default)')} ({when})")
