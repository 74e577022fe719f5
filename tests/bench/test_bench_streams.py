"""`bench/bench_streams.py` runs end to end (a small configuration) and prints each engine with and without streams,
the ratios and the error against plain eager."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_streams_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_streams.py"), "--input-sizes", "96", "--batch", "4",
           "--threads", "2", "--rounds", "1", "--no-inductor", "--no-runtimes"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| input |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "input", "eager", "eager streams", "eager streams / eager", "max peak-relative error"]
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| 96 |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(v) > 0 for v in cells[1:3])
    assert re.fullmatch(r"[0-9.]+x", cells[3]) and float(cells[4]) <= 1e-4
