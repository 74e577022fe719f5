"""`rtmdet serve` sets OpenMP's wait policy before OpenMP starts, on both ways in: `python -m service serve`
and the `rtmdet` console script (both before torch is imported); a policy the operator set is kept."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from svc_helpers import REPO

# What the `rtmdet` console script does: import service.cli, then main(argv).
CONSOLE_SCRIPT = "import sys; from service.cli import main; sys.argv[0] = 'rtmdet'; sys.exit(main(sys.argv[1:]))"


def serve(tmp_path, via: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RTMDET_OMP_WAIT_POLICY")}
    # A missing weights file: the server starts, says its threads, fails to load and exits 2 (no port held).
    return subprocess.run([sys.executable, *via, "serve", "--weights", str(tmp_path / "missing.pth"),
                           "--http-port", "0", "--grpc-port", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**base, "PYTHONPATH": str(REPO), "RTMDET_DEVICE": "cpu", **env})


# A program that imported torch before calling the command line: `serve` re-executes it with the policy set.
TORCH_FIRST = "import torch; " + CONSOLE_SCRIPT


@pytest.mark.parametrize("via", [["-m", "service"], ["-c", CONSOLE_SCRIPT], ["-c", TORCH_FIRST]],
                         ids=["python-m-service", "console", "torch-imported-first"])
def test_serve_runs_with_a_passive_wait_policy_by_default(tmp_path, via):
    proc = serve(tmp_path, via)
    assert proc.returncode == 2, proc.stderr
    assert "OMP_WAIT_POLICY=PASSIVE (before OpenMP loaded)" in proc.stdout, proc.stdout + proc.stderr
    assert "OpenCV 1" in proc.stdout
    assert "malloc: keeps freed blocks" in proc.stdout  # model.inference.allocator, on by default


def test_keep_freed_memory_can_be_turned_off(tmp_path):
    proc = serve(tmp_path, ["-m", "service"], RTMDET_KEEP_FREED_MEMORY="false")
    assert proc.returncode == 2, proc.stderr
    assert "malloc: glibc's defaults (RTMDET_KEEP_FREED_MEMORY=false)" in proc.stdout, proc.stdout + proc.stderr


def test_an_operator_wait_policy_is_kept(tmp_path):
    proc = serve(tmp_path, ["-c", CONSOLE_SCRIPT], OMP_WAIT_POLICY="ACTIVE")
    assert "OMP_WAIT_POLICY=ACTIVE (before OpenMP loaded)" in proc.stdout, proc.stdout + proc.stderr
    proc = serve(tmp_path, ["-m", "service"], RTMDET_OMP_WAIT_POLICY="ACTIVE", RTMDET_TORCH_THREADS="1")
    assert "OMP_WAIT_POLICY=ACTIVE" in proc.stdout and "torch 1," in proc.stdout, proc.stdout + proc.stderr
