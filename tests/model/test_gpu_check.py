"""`make gpu-check` on a machine without CUDA: it says so and exits 2, having checked nothing."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_cuda_says_so_and_exits_2():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA device here" in res.stderr
    assert "| check |" not in res.stdout  # no table: nothing was checked
