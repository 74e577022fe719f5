"""A real Triton Inference Server on 127.0.0.1: the `tritonserver` 2.51 that PyPI's nvidia-pytriton
bundles, from the `.venv-triton` that `make triton-env` builds (it needs numpy<2, so a venv of its own).

That build has only the Python backend, so models are served through `model/triton_python_model.py`
(onnxruntime inside Triton). Its stub links libpython dynamically: LD_LIBRARY_PATH must name the
Python that made the venv, or model loading fails (`_thread.RLock ... _recursion_count`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.service.svc_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-triton"


class TritonServer:
    def __init__(self, repository: Path, log_path: Path) -> None:
        python = VENV / "bin" / "python"
        assert python.exists(), f"{VENV} is missing: run `make triton-env`"
        probe = "import site, sysconfig; print(site.getsitepackages()[0]); print(sysconfig.get_config_var('LIBDIR'))"
        site_dir, libdir = subprocess.check_output([str(python), "-c", probe], text=True).split()
        site = Path(site_dir)
        dist = site / "pytriton" / "tritonserver"
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{site / 'nvidia_pytriton.libs'}",
                    "PYTHONPATH": str(site), "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
                    "RTMDET_ORT_THREADS": "1"}
        self.cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repository}",
                    f"--backend-directory={dist / 'backends'}", "--http-address=127.0.0.1",
                    "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", f"--http-port={self.http_port}",
                    f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
                    "--exit-timeout-secs=3", "--strict-model-config=true"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> TritonServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def wait_ready(self, model: str = "rtmdet", timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.http}/v2/models/{model}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tritonserver not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
