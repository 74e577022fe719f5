"""bench/bench_reduced_decode.py runs end to end (a small configuration): a full and a reduced row per size, the
reduced decode smaller only where the image is at least twice the input, and the same detections where it is not."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reduced_decode_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_reduced_decode.py"), "--img-sizes", "320", "1280",
           "--n-val", "4", "--rounds", "1", "--scenes", "upscaled"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {(r[1], r[2]): r for r in ([c.strip() for c in line.strip("|").split("|")]
                                      for line in out.stdout.splitlines() if re.match(r"\| upscaled \| \d+ \|", line))}
    assert sorted(rows) == [("1280", "full"), ("1280", "reduced"), ("320", "full"), ("320", "reduced")]
    mpx = {k: float(r[4]) for k, r in rows.items()}
    assert mpx["320", "reduced"] == mpx["320", "full"]  # under twice the input: decoded whole
    assert mpx["1280", "reduced"] < mpx["1280", "full"] / 10  # 1/4 scale: a sixteenth of the pixels
    for r in rows.values():
        assert 0.0 <= float(r[5]) <= 1.0 and float(r[3]) > 0  # mAP, decode ms
    assert rows["320", "full"][5] == rows["320", "reduced"][5]  # the same image, the same mAP
    assert rows["320", "reduced"][7].startswith("1.000 / 1.000")
