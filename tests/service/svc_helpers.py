"""Helpers for the service tests: a test checkpoint, real `rtmdet serve` subprocesses, image bytes."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import torch
from torch import nn

import model
from model.checkpoint import make_meta

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
INPUT_SIZE = 320


# A small, deterministic RTMDet-tiny checkpoint that finds boxes of all three classes in real photos.
# A freshly built network's features shrink to ~0 through its layers (so every score is exactly 0.5 and
# every box empty); re-initialising the convs (He-normal, seeded) keeps activations alive, and the head's
# last layers are scaled so that scores spread out and a few dozen boxes pass the 0.3 threshold.
CLASS_NAMES = ["circle", "square", "triangle"]
CLS_BIAS = (-1.55, -1.15, -1.35)  # per-class logit offsets, chosen so each class has detections


def make_test_checkpoint(path: Path, class_names=CLASS_NAMES, cls_bias=CLS_BIAS) -> Path:
    torch.manual_seed(0)
    m = model.build_rtmdet("tiny", num_classes=len(class_names))
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    for conv in m.bbox_head.rtm_cls:
        nn.init.normal_(conv.weight, std=5.0)
        with torch.no_grad():
            conv.bias.copy_(torch.tensor(cls_bias))
    for conv in m.bbox_head.rtm_reg:
        nn.init.normal_(conv.weight, std=0.3)
        nn.init.constant_(conv.bias, 1.5)  # boxes about 3 strides wide
    model.save_checkpoint(path, m.state_dict(), make_meta(list(class_names)))
    return path


def make_variant_checkpoint(src: Path, dst: Path, cls_shift: float = 0.5) -> Path:
    """Another version of `src`: the class logits shifted by `cls_shift` (more boxes, higher scores)."""
    from model.checkpoint import class_names_from_meta, read_checkpoint

    state, meta = read_checkpoint(src)
    for k in [k for k in state if k.startswith("bbox_head.rtm_cls") and k.endswith("bias")]:
        state[k] = state[k] + cls_shift
    model.save_checkpoint(dst, state, make_meta(class_names_from_meta(meta)))
    return dst


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m service serve` in a subprocess; `.http` is its base URL, `.grpc` its target."""

    def __init__(self, weights: Path, log_path: Path, *args: str, weights_flag: bool = True, verify=None,
                 **env: str) -> None:
        """`args` are more `rtmdet serve` flags; `weights_flag=False` leaves out `--weights`; `verify` (an
        ssl.SSLContext) makes `.http` an https:// URL and is what `wait_ready` checks the server with."""
        self.http_port, self.grpc_port = free_port(), free_port()
        self.verify = verify if verify is not None else True
        self.http = f"{'https' if verify is not None else 'http'}://127.0.0.1:{self.http_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.env = {**os.environ, "RTMDET_INPUT_SIZE": str(INPUT_SIZE), "RTMDET_DEVICE": "cpu",
                    "RTMDET_DECODE_THREADS": "2", "PYTHONPATH": str(REPO), **env}
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", *(("--weights", str(weights)) if weights_flag else ()),
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *args], cwd=REPO, env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.http}/readyz", timeout=2, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself (after a signal the test already sent)."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def serving(srv: ServerProcess):
    """A started server, waited ready, stopped on the way out (for module fixtures: `with serving(...) as s`)."""
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def metric_samples(base_url: str) -> dict:
    """Every sample of /metrics: {(name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_value(snap: dict, name: str, **labels) -> float:
    """The sum over the samples of `name` that carry these labels (whatever other labels they have, e.g. `model`)."""
    return sum(v for (n, items), v in snap.items() if n == name and labels.items() <= dict(items).items())
