"""`rtmdet serve` with a missing, truncated or wrong-size checkpoint: one error line naming the file and
the problem, a non-zero exit, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from svc_helpers import REPO, free_port


def serve(weights, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RTMDET_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "service", "serve", "--weights", str(weights), "--http-port",
                           str(free_port()), "--grpc-port", str(free_port()), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("rtmdet serve: error:")]


@pytest.mark.parametrize("case", ["missing", "truncated", "not-a-checkpoint", "wrong-size"])
def test_bad_checkpoint_exits_with_one_line_naming_file_and_problem(case, checkpoint, tmp_path):
    extra: tuple[str, ...] = ()
    if case == "missing":
        path, problem = tmp_path / "nowhere.pth", "not found"
    elif case == "truncated":
        path, problem = tmp_path / "half.pth", "not a readable checkpoint"
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not-a-checkpoint":
        path, problem = tmp_path / "notes.pth", "not a readable checkpoint"
        path.write_text("these are not weights\n")
    else:  # an RTMDet-tiny checkpoint served as RTMDet-s
        path, problem, extra = checkpoint, "does not fit the model", ("--size", "s")
    proc = serve(path, *extra)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
