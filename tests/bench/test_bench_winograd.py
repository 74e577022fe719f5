"""`bench/bench_winograd.py` runs end to end (a small configuration) and prints eager and inductor with and
without the Winograd convolutions beside the plain runtimes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two inductor compiles; the Winograd convolutions themselves are tested in the default run
def test_bench_winograd_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_winograd.py"), "--sizes", "tiny", "--input-size", "64",
           "--batches", "1", "--threads", "1", "--seconds", "0.05", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| size |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "size", "batch", "threads", "eager direct", "eager winograd", "inductor direct", "inductor winograd",
        "ONNX Runtime", "OpenVINO", "eager: winograd / direct", "inductor: winograd / direct",
        "eager winograd / best peer", "inductor winograd / best peer", "peak err"]
    (row,) = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
              if line.startswith("| tiny |")]
    assert all(float(v) > 0 for v in row[3:9])
    assert all(re.fullmatch(r"[0-9.]+x", v) for v in row[9:13])
    assert float(row[13]) <= 1e-4
