"""`make bench`'s first command runs end to end (a small configuration): its table has every runner and peer,
and `auto`'s pick is one of this project's runners."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runners_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_runners.py"), "--sizes", "tiny", "--batches", "1", "2",
           "--threads", "2", "--seconds", "0.2", "--rounds", "1", "--no-mmdet", "--no-inductor", "--input-size", "96"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if re.match(r"\| (forward|detector) \| tiny \|", line)]
    assert len(rows) == 4, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        what, size, batch, threads, eager, inductor, ort, ov, ort_plain, ov_plain, mmdet, pick, _, over = cells
        assert inductor == mmdet == "n/a" and threads == "2"
        assert all(float(v) > 0 for v in (eager, ort, ov, ort_plain, ov_plain))
        assert pick in ("eager", "onnxruntime", "openvino") and over.endswith("x") and float(over[:-1]) > 0
