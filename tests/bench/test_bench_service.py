"""`bench/bench_service.py` runs end to end (a small configuration): a real `rtmdet serve` under both
protocols, every cell measured once per round beside its own baseline, and the CPU columns filled from the
server's /proc entry and the load generator's own clock."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# 26.6 s here; the CI rehearsal of 1f649c6 took 893.9 s of the default run's 900: make test-all runs it. The
# server, both protocols and the batcher it drives are tested in the default run (tests/service).
@pytest.mark.slow
def test_bench_service_prints_its_table():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_service.py"), "--input-size", "96", "--batch", "2",
           "--concurrency", "1", "4", "--duration", "0.6", "--rounds", "2", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "medians over 2 round(s)" in out.stdout, out.stdout
    rows = [line for line in out.stdout.splitlines() if re.match(r"\| (http|grpc) \| \d+ \|", line)]
    assert len(rows) == 4, out.stdout
    for row in rows:
        proto, conc, ips, p50, _, _, errors, ref, vs, base_cpu, server_cpu, client_cpu = \
            [c.strip() for c in row.strip("|").split("|")]
        assert float(ips) > 0 and float(p50) > 0 and errors == "0", row
        assert float(server_cpu.rstrip("%")) > 0 and float(client_cpu.rstrip("%")) >= 0, row
        if conc == "1":
            assert ref.startswith("batch-1 p50") and vs.startswith("p50 "), row
        else:
            assert ref.startswith("batch-2") and re.fullmatch(r"[\d.]+x throughput \([\d.]+-[\d.]+\)", vs), row
            assert float(base_cpu.rstrip("%")) > 0, row
