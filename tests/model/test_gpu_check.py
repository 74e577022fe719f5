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


def test_serve_section_runs_the_real_server_and_keeps_the_callers_path(tmp_path, monkeypatch):
    # The one section that needs no GPU, run on the CPU: a real `rtmdet serve` answering real requests. The
    # server's PYTHONPATH must keep the caller's entries: on the lent GPU machine the web stack lives in the
    # carried wheels' /tmp/site (tools/device_gpu_check.sh), which `PYTHONPATH=<repo>` alone used to drop.
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    extra = tmp_path / "site"
    extra.mkdir()
    (extra / "sitecustomize.py").write_text(  # runs at the server's start only if the path kept `extra`
        f"open({str(tmp_path / 'seen')!r}, 'w').write('kept')\n")
    monkeypatch.setenv("PYTHONPATH", str(extra))
    assert gpu_check.child_env()["PYTHONPATH"].split(os.pathsep) == [str(REPO), str(extra)]
    jpegs = [(REPO / "examples" / f).read_bytes() for f in gpu_check.PHOTO_FILES]
    check, stats = gpu_check.serve_requests(jpegs, 16, gpu_check.Deadline(600), device="cpu")
    assert check.status == "PASS", check
    assert stats["ok"] == 16 and stats["device"] == "cpu" and stats["p50_ms"] > 0
    assert (tmp_path / "seen").read_text() == "kept"
