"""bench/bench_low_precision.py runs end to end (a small configuration): a row per runner, the reduced-precision
ones with an error above float32's (they really run in bf16 / int8) and a speed ratio; bf16 is said to be
unavailable exactly when OpenVINO reports no bfloat16 arithmetic on this CPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.inference.low_precision import openvino_cpu_capabilities

ROOT = Path(__file__).resolve().parents[2]
HAS_BF16 = "BF16" in openvino_cpu_capabilities()


@pytest.mark.slow  # 22 s of the default run's 15 minutes; the reduced-precision runners are tested in it
def test_bench_low_precision_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_low_precision.py"), "--img-size", "96", "--batches", "1", "2",
           "--threads", "2", "--seconds", "0.2", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if re.match(r"\| [12] \| 2 \| ", line)]
    assert [r[2] for r in rows] == ["eager", "onnxruntime", "openvino", "openvino-bf16", "openvino-int8"] * 2
    for _batch, _threads, name, speed, ratio, err in rows:
        if speed == "unavailable here":
            assert name == "openvino-bf16" and not HAS_BF16, name
            assert "openvino-bf16 left out: openvino-bf16: this CPU does not compute bfloat16" in out.stdout
            continue
        assert float(speed) > 0 and ratio.endswith("x") and float(ratio[:-1]) > 0
        assert (float(err) > 1e-4) == (name in ("openvino-bf16", "openvino-int8")), (name, err)
