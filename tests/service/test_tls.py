"""TLS and mTLS on both protocols, against real `rtmdet serve` processes with a PKI the test makes.

One server with TLS (and the plain-text health port), one with mTLS; each test calls HTTP and gRPC."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from svc_helpers import REPO, ServerProcess, free_port, jpeg, serving
from tls_certs import TestCA

from service.client import GrpcDetectorClient, HttpDetectorClient
from service.tls import client_ssl_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = TestCA(folder, "good"), TestCA(folder, "rogue")
    return {"ca": ca, "rogue": rogue, "server": ca.issue("server", server=True),
            "client": ca.issue("client", server=False), "rogue_client": rogue.issue("client", server=False)}


@pytest.fixture(scope="module")
def tls_server(checkpoint, pki, tmp_path_factory):
    """TLS on both protocols, no client certificates; plain-text /healthz, /readyz, /metrics on a side port."""
    health_port = free_port()
    srv = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "tls.log",
                        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
                        verify=client_ssl_context(pki["ca"].cert_file, None, None),
                        RTMDET_HEALTH_PORT=str(health_port), RTMDET_WARMUP="false")
    srv.health = f"http://127.0.0.1:{health_port}"
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def mtls_server(checkpoint, pki, tmp_path_factory):
    """mTLS: client certificates signed by the good CA, on both protocols."""
    srv = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "mtls.log",
                        verify=client_ssl_context(pki["ca"].cert_file, pki["client"].cert, pki["client"].key),
                        RTMDET_TLS_CERT_FILE=str(pki["server"].cert), RTMDET_TLS_KEY_FILE=str(pki["server"].key),
                        RTMDET_TLS_CLIENT_CA_FILE=str(pki["ca"].cert_file), RTMDET_WARMUP="false")
    with serving(srv):
        yield srv


@pytest.fixture(scope="module")
def image(photos) -> bytes:
    return jpeg(photos["coffee"])


def grpc_detect(target: str, image: bytes, **tls) -> dict:
    with GrpcDetectorClient(target, timeout=20, **tls) as c:
        return c.detect(image)


def test_tls_server_answers_a_client_that_trusts_its_ca_on_both_protocols(tls_server, pki, image):
    with HttpDetectorClient(tls_server.http, ca=pki["ca"].cert_file, timeout=30) as c:
        http_answer = c.detect(image)
    grpc_answer = grpc_detect(tls_server.grpc, image, ca=pki["ca"].cert_file)
    assert http_answer["detections"] and http_answer["width"] == 300
    assert [d["box"] for d in grpc_answer["detections"]] == [d["box"] for d in http_answer["detections"]]


def test_tls_server_is_refused_by_a_client_that_does_not_trust_its_ca(tls_server, pki, image):
    with HttpDetectorClient(tls_server.http, ca=pki["rogue"].cert_file, timeout=10) as c, \
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        c.detect(image)
    with pytest.raises(grpc.RpcError) as err:
        grpc_detect(tls_server.grpc, image, ca=pki["rogue"].cert_file)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_ports_speak_no_plain_text(tls_server, image):
    with pytest.raises(httpx.TransportError):  # the TLS port does not talk HTTP in the clear
        httpx.get(tls_server.http.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        grpc_detect(tls_server.grpc, image)  # an insecure channel to the TLS port
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_and_metrics_on_the_tls_port_and_the_plain_text_side_port(tls_server, pki):
    verify = client_ssl_context(pki["ca"].cert_file, None, None)
    assert httpx.get(f"{tls_server.http}/healthz", verify=verify, timeout=5).json() == {"status": "ok"}
    assert httpx.get(f"{tls_server.health}/healthz", timeout=5).json() == {"status": "ok"}
    assert httpx.get(f"{tls_server.health}/readyz", timeout=5).json() == {"status": "ready"}
    assert "rtmdet_requests_total" in httpx.get(f"{tls_server.health}/metrics", timeout=5).text
    # The side port is for probes and scrapers only: no detection, no model management, in the clear.
    assert httpx.post(f"{tls_server.health}/detect", content=b"x", timeout=5).status_code == 404
    assert httpx.get(f"{tls_server.health}/v1/models", timeout=5).status_code == 404
    # gRPC health is on the TLS port
    with grpc.secure_channel(tls_server.grpc, grpc.ssl_channel_credentials(pki["ca"].cert_file.read_bytes())) as ch:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mtls_server_answers_a_client_with_a_certificate_from_its_ca(mtls_server, pki, image):
    tls = dict(ca=pki["ca"].cert_file, cert=pki["client"].cert, key=pki["client"].key)
    with HttpDetectorClient(mtls_server.http, timeout=30, **tls) as c:
        assert c.detect(image)["detections"]
        assert c.models()[0]["model"] == "default"
    assert grpc_detect(mtls_server.grpc, image, **tls)["detections"]


@pytest.mark.parametrize("client", ["none", "rogue"])
def test_mtls_server_refuses_a_client_without_a_certificate_from_its_ca(mtls_server, pki, image, client):
    tls = {"ca": pki["ca"].cert_file}
    if client == "rogue":
        tls.update(cert=pki["rogue_client"].cert, key=pki["rogue_client"].key)
    # Refused at the handshake: no HTTP status at all (TLS 1.3 reports it on the first read), health included.
    for path in ("/detect", "/healthz"):
        with HttpDetectorClient(mtls_server.http, timeout=10, **tls) as c, pytest.raises(httpx.TransportError):
            c.http.post(path, content=image, headers={"Content-Type": "image/jpeg"})
    with pytest.raises(grpc.RpcError) as err:
        grpc_detect(mtls_server.grpc, image, **tls)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rtmdet_client_takes_ca_cert_and_key_on_both_protocols(mtls_server, pki, tmp_path, image):
    # A folder of images at --concurrency 8, over mTLS: one JSON line per image on both protocols.
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(image)
    tls = ["--ca", str(pki["ca"].cert_file), "--cert", str(pki["client"].cert), "--key", str(pki["client"].key)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for proto in (["--url", mtls_server.http], ["--grpc", "--target", mtls_server.grpc]):
        proc = subprocess.run([sys.executable, "-m", "service", "client", str(folder), "--concurrency", "8", *proto,
                               *tls], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [Path(r["file"]).name for r in lines] == ["a.jpg", "b.jpg", "c.jpg"]
        assert all("detections" in r for r in lines)
        # Without the client certificate every image fails with an error line, not a traceback.
        proc = subprocess.run([sys.executable, "-m", "service", "client", str(folder), *proto, *tls[:2],
                               "--attempts", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "3 images, 0 ok, 3 failed" in proc.stderr
        assert all("error" in json.loads(line) for line in proc.stdout.splitlines())


def serve_with(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RTMDET_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "service", "serve", "--http-port", str(free_port()),
                           "--grpc-port", str(free_port()), *flags], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("case", ["missing-cert", "missing-key", "mismatched", "garbage-cert", "garbage-key",
                                  "cert-without-key", "garbage-ca", "unreadable-key"])
def test_bad_tls_files_stop_the_start_with_one_line_naming_the_file(case, pki, tmp_path):
    good, other = pki["server"], pki["client"]
    cert, key, ca = good.cert, good.key, None
    if case == "missing-cert":
        cert = named = tmp_path / "nowhere.pem"
    elif case == "missing-key":
        key = named = tmp_path / "nowhere.key"
    elif case == "mismatched":
        key = named = other.key  # a real key, not this certificate's
    elif case == "garbage-cert":
        cert = named = tmp_path / "garbage.pem"
        named.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif case == "garbage-key":
        key = named = tmp_path / "garbage.key"
        named.write_text("hello\n")
    elif case == "unreadable-key":  # a folder where the key should be (root reads any file, so not chmod)
        key = named = tmp_path / "keydir"
        named.mkdir()
    elif case == "garbage-ca":
        ca = named = tmp_path / "garbage-ca.pem"
        named.write_text("nothing here\n")
    else:
        named, key = cert, None
    flags = ["--tls-cert", str(cert)] + (["--tls-key", str(key)] if key else []) + (
        ["--tls-client-ca", str(ca)] if ca else [])
    proc = serve_with(tmp_path, *flags)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtmdet serve: error:")]
    assert len(lines) == 1 and str(named) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stdout  # refused before anything started


def test_client_ssl_context_verifies_hostnames(pki):
    ctx = client_ssl_context(pki["ca"].cert_file, None, None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
