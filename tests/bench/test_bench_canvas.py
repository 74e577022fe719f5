"""`bench/bench_canvas.py` runs end to end (a small configuration) and prints the Detector on both canvases beside
the plain runtimes, with the tight canvas's shape per photo shape."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 18 s of the default run's 15 minutes; the tight canvas itself is tested in the default run
def test_bench_canvas_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_canvas.py"), "--sizes", "tiny", "--input-size", "96",
           "--batches", "2", "--threads", "1", "--shapes", "16:9", "3:4", "--seconds", "0.05", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| photo |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "photo", "canvas", "size", "batch", "threads", "eager square", "eager tight", "onnxruntime square",
        "onnxruntime tight", "openvino square", "openvino tight", "ONNX Runtime (square)", "OpenVINO (square)",
        "auto picks", "boxes / image", "auto: tight / square", "best tight / best peer"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in out.stdout.splitlines() if re.match(r"\| (16:9|3:4) \|", line)}
    # At 96 a 16:9 photo is 96 x 54, on a 64 x 96 canvas; a 3:4 one 72 x 96, on 96 x 96 (72 rounds up to 96).
    assert rows["16:9"][1] == "64x96" and rows["3:4"][1] == "96x96"
    for cells in rows.values():
        assert all(float(v) > 0 for v in cells[5:13])
        assert cells[13] in ("eager", "onnxruntime", "openvino")
        assert re.fullmatch(r"[0-9.]+x", cells[15]) and re.fullmatch(r"[0-9.]+x", cells[16])
