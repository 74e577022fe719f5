"""POST /detect and friends against a real `rtmdet serve` (uvicorn on 127.0.0.1)."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import cv2
import httpx
import numpy as np
import pytest
from svc_helpers import CLASS_NAMES, INPUT_SIZE, jpeg, metric_samples, metric_value, png

from model import Detector, TestConfig


@pytest.fixture(scope="module")
def client(server, auth):
    with httpx.Client(base_url=server.http, headers=auth, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu",
                                    test_cfg=TestConfig.serving(input_size=INPUT_SIZE, max_per_img=100))


def assert_same_detections(got: list[dict], want, atol_box: float = 0.02, atol_score: float = 2e-4) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want.to_list()):
        assert g["label"] == w["label"] and g["class_name"] == w["class_name"]
        assert g["score"] == pytest.approx(w["score"], abs=atol_score)
        np.testing.assert_allclose(g["box"], w["box"], atol=atol_box)


def test_detect_equals_the_detectors_own_output(client, detector, photos):
    img = photos["astronaut"]
    data = jpeg(img)
    want = detector([cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)])[0]
    r = client.post("/detect", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (img.shape[1], img.shape[0])
    assert body["model"]["name"] == "rtmdet-tiny" and body["model"]["size"] == "tiny"
    assert_same_detections(body["detections"], want)
    t = body["timing"]
    assert t["inference_ms"] > 0 and t["decode_ms"] > 0 and t["batch_size"] >= 1
    assert t["total_ms"] >= t["inference_ms"]


def test_multipart_upload_and_png_give_the_same_answer(client, detector, photos):
    img = photos["coffee"]
    want = detector([img])[0]
    r = client.post("/detect", files={"image": ("coffee.png", png(img), "image/png")})
    assert r.status_code == 200, r.text
    assert_same_detections(r.json()["detections"], want)


def test_query_parameters_filter_like_the_detector(client, detector, photos):
    img = photos["astronaut"]
    data = png(img)
    cfg = detector.with_config(score_thr=0.305, max_per_img=1000)
    full = detector([img], cfg)[0]
    wanted = [d for d in full.to_list() if d["class_name"] in ("circle", "square")][:12]
    assert len(wanted) == 12 and {d["class_name"] for d in wanted} == {"circle", "square"}
    r = client.post("/detect", content=data, headers={"Content-Type": "image/png"},
                    params={"score_threshold": 0.305, "max_detections": 12, "classes": "circle,square"})
    assert r.status_code == 200, r.text
    got = r.json()["detections"]
    assert [d["class_name"] for d in got] == [d["class_name"] for d in wanted]
    np.testing.assert_allclose([d["box"] for d in got], [d["box"] for d in wanted], atol=0.02)
    # repeated `classes` works too
    r2 = client.post("/detect", content=data, headers={"Content-Type": "image/png"},
                     params=[("score_threshold", 0.305), ("max_detections", 12), ("classes", "circle"),
                             ("classes", "square")])
    assert r2.json()["detections"] == got


def test_render_returns_the_image_with_boxes(client, photos):
    img = photos["coffee"]
    r = client.post("/detect/render", content=png(img), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    out = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 1  # boxes were drawn


def test_health_ready_model_and_docs(server, client, checkpoint):
    assert httpx.get(f"{server.http}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.http}/readyz").json() == {"status": "ready"}
    info = client.get("/v1/model").json()
    import hashlib
    assert info["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert info["classes"] == CLASS_NAMES and info["input_size"] == INPUT_SIZE
    assert (info["device"], info["dtype"], info["backend"], info["size"]) == ("cpu", "float32", "torch", "tiny")
    assert (info["runner"], info["runner_choice"]) == ("eager", None)  # the CPU's default runner, nothing measured
    assert info["canvas"] == "square"  # the official letterbox unless RTMDET_CANVAS says tight
    assert httpx.get(f"{server.http}/docs").status_code == 200
    schema = httpx.get(f"{server.http}/openapi.json").json()
    assert "DetectResponse" in schema["components"]["schemas"]
    content = schema["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png", "image/webp", "image/bmp"} <= set(content)


def post(client, data: bytes, ctype: str = "image/jpeg", **params) -> httpx.Response:
    return client.post("/detect", content=data, headers={"Content-Type": ctype}, params=params)


def test_bad_inputs_get_clear_errors(client, photos):
    good = jpeg(photos["coffee"])
    cases = [
        (b"", "image/jpeg", 400, "empty"),
        (b"this is not an image, just some text" * 3, "image/jpeg", 400, "not an image"),
        (good[: len(good) // 2], "image/jpeg", 400, "truncated"),
        (good, "text/plain", 415, "content type"),
        (b"GIF89a" + b"\x00" * 64, "image/gif", 415, "content type"),
        (b"GIF89a" + b"\x00" * 64, "application/octet-stream", 415, "gif"),
        (cv2.imencode(".png", np.zeros((1500, 1500), np.uint8))[1].tobytes(), "image/png", 413, "pixels"),
    ]
    for data, ctype, status, words in cases:
        r = post(client, data, ctype)
        assert r.status_code == status, (ctype, words, r.text)
        assert words in r.json()["detail"].lower(), r.text
    r = client.post("/detect", files={"file": ("x.jpg", good, "image/jpeg")})
    assert r.status_code == 400 and "image" in r.json()["detail"]
    assert post(client, good, classes="dog").status_code == 400
    assert post(client, good, score_threshold=2).status_code == 422
    # after all that, the server still answers good requests
    assert post(client, good).status_code == 200


def test_too_large_upload_is_refused_by_declared_length(client):
    r = post(client, b"\xff\xd8\xff" + b"\x00" * (1024 * 1024 + 10))
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_too_large_upload_is_refused_while_streaming(server, auth):
    """A chunked body (no Content-Length) of 64 MiB: the 413 must come long before the client is done."""
    url = urlparse(server.http)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    head = (f"POST /detect HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: image/jpeg\r\n"
            f"Authorization: {auth['Authorization']}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    sock.sendall(head)
    chunk = b"\xff\xd8\xff" + b"\x00" * (64 * 1024 - 3)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, reply = 0, b""
    sock.settimeout(0.0)
    deadline = time.monotonic() + 60
    try:
        while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
            try:
                reply += sock.recv(65536)
                if reply:
                    break
            except BlockingIOError:
                pass
            try:
                sock.sendall(framed)
                sent += len(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(10)
        while b"\r\n\r\n" not in reply:
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 32 * 1024 * 1024  # refused part-way, not after reading all 64 MiB


def test_api_key_is_required(server, photos):
    data = jpeg(photos["coffee"])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}):
        r = httpx.post(f"{server.http}/detect", content=data, headers={"Content-Type": "image/jpeg", **headers})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.http}/v1/model").status_code == 401
    assert httpx.get(f"{server.http}/healthz").status_code == 200  # probes and scraping stay open
    assert httpx.get(f"{server.http}/metrics").status_code == 200


def test_cors_is_off_by_default(server):
    r = httpx.options(f"{server.http}/detect", headers={"Origin": "https://elsewhere.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


sample = metric_value


def test_metrics_parse_and_count_the_requests_made(server, client, photos):
    data = jpeg(photos["coffee"])
    before = metric_samples(server.http)
    for _ in range(3):
        assert post(client, data).status_code == 200
    assert post(client, b"", "image/jpeg").status_code == 400
    after = metric_samples(server.http)
    key = dict(protocol="http", endpoint="/detect")
    assert sample(after, "rtmdet_requests_total", status="200", **key) - \
        sample(before, "rtmdet_requests_total", status="200", **key) == 3
    assert sample(after, "rtmdet_requests_total", status="400", **key) - \
        sample(before, "rtmdet_requests_total", status="400", **key) == 1
    assert sample(after, "rtmdet_request_duration_seconds_count", **key) - \
        sample(before, "rtmdet_request_duration_seconds_count", **key) == 4
    for stage in ("decode", "preprocess", "queue_wait", "inference", "postprocess"):
        grew = sample(after, "rtmdet_stage_duration_seconds_count", stage=stage) - \
            sample(before, "rtmdet_stage_duration_seconds_count", stage=stage)
        assert grew >= 3 if stage in ("decode", "preprocess", "queue_wait") else grew >= 1, stage
    images = sample(after, "rtmdet_batch_size_sum") - sample(before, "rtmdet_batch_size_sum")
    assert images == 3  # the empty upload never reached the model
    info = [k for k in after if k[0] == "rtmdet_model_info"]
    assert info and dict(info[0][1])["name"] == "rtmdet-tiny"
    assert ("rtmdet_queue_depth", (("model", "default"),)) in after
    assert sample(after, "rtmdet_stage_duration_seconds_bucket", stage="inference", le="0.0001") is not None
