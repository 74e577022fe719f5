"""The committed gRPC stubs are what proto/ generates; `rtmdet serve` flags override RTMDET_* settings."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from svc_helpers import REPO

from model.errors import UserError
from service.cli import build_parser
from service.commands import settings_from_args
from service.proto_build import GENERATED, OUT_DIR, generate


def test_committed_stubs_are_fresh(tmp_path):
    generate(tmp_path)
    for rel in GENERATED:
        assert (tmp_path / rel).read_text() == (OUT_DIR / rel).read_text(), f"{rel} is stale: run `make proto`"


def test_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RTMDET_HTTP_PORT", "9000")
    monkeypatch.setenv("RTMDET_GRPC_PORT", "9001")
    monkeypatch.setenv("RTMDET_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("RTMDET_SIZE", "s")
    args = build_parser().parse_args(["serve", "--http-port", "8123", "--size", "tiny", "--weights",
                                      str(tmp_path / "w.pth")])
    s = settings_from_args(args)
    assert (s.http_port, s.grpc_port, s.max_batch_size, s.size) == (8123, 9001, 16, "tiny")
    assert s.weights == tmp_path / "w.pth"
    assert s.api_key is None and s.cors_origins == []  # no key and no CORS unless configured


def test_bad_environment_is_reported(monkeypatch):
    monkeypatch.setenv("RTMDET_MAX_BATCH_SIZE", "zero")
    args = argparse.Namespace(host=None, http_port=None, grpc_port=None, weights=None, size=None, device=None)
    with pytest.raises(UserError, match="max_batch_size") as err:
        settings_from_args(args)
    assert "\n" not in str(err.value)  # the program prints it as one line


def test_serve_with_missing_weights_exits_with_a_clear_error(tmp_path):
    from svc_helpers import free_port
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--weights", str(tmp_path / "missing.pth"),
                           "--http-port", str(free_port()), "--grpc-port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "missing.pth" in proc.stderr and "not found" in proc.stderr
