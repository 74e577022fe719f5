"""`make bench`'s first command runs end to end (a small configuration): its table has every runner and peer,
`auto`'s pick is one of this project's runners, and the sparse-regression Detector has its column."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# Both workloads in `make test-all` only: the shipped one took 35 s of the default run's 15 minutes for the
# script's table, and the runners it times are tested in the default run (tests/model/test_runners.py).
@pytest.mark.slow
@pytest.mark.parametrize("workload", ["seeded", "shipped"])
def test_bench_runners_prints_its_table(workload):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_runners.py"), "--sizes", "tiny", "--batches", "1", "2",
           "--threads", "2", "--seconds", "0.2", "--rounds", "1", "--no-mmdet", "--no-inductor", "--input-size", "96",
           "--workload", workload]
    if workload == "shipped":
        cmd[cmd.index("96")] = "320"  # its training size: real detections
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if re.match(rf"\| (forward|detector) \| {workload} \| tiny \|",
                                                                 line)]
    assert len(rows) == 4, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        (what, _, size, batch, threads, eager, inductor, ort, ov, ort_plain, ov_plain, mmdet, pick, _, over,
         boxes, sparse, sparse_over) = cells
        assert inductor == mmdet == "n/a" and threads == "2"
        assert all(float(v) > 0 for v in (eager, ort, ov, ort_plain, ov_plain))
        assert pick in ("eager", "onnxruntime", "openvino") and over.endswith("x") and float(over[:-1]) > 0
        if what == "forward":
            assert boxes == sparse == sparse_over == "n/a"
            continue
        speed, sparse_pick = re.fullmatch(r"([0-9.]+) \((\w+)\)", sparse).groups()
        assert float(speed) > 0 and sparse_pick in ("eager", "onnxruntime", "openvino")
        assert sparse_over.endswith("x") and float(sparse_over[:-1]) > 0
        if workload == "shipped":
            assert float(boxes) >= 1  # the shipped model finds shapes in every scene
