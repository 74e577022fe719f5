"""rtmdet.v1.Detector over a real gRPC channel, plus health and reflection."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from svc_helpers import API_KEY, CLASS_NAMES, INPUT_SIZE, jpeg, png

from model import Detector, TestConfig
from service.client import GrpcDetectorClient
from service.proto_gen.rtmdet.v1 import detector_pb2 as pb


@pytest.fixture(scope="module")
def client(server):
    with GrpcDetectorClient(server.grpc, api_key=API_KEY, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu",
                                    test_cfg=TestConfig.serving(input_size=INPUT_SIZE, max_per_img=100))


def assert_same(resp: pb.DetectResponse, want) -> None:
    assert len(resp.detections) == len(want) > 0
    for d, box, score, label, name in zip(resp.detections, want.boxes, want.scores, want.labels, want.class_names):
        assert (d.label, d.class_name) == (int(label), name)
        assert d.score == pytest.approx(float(score), abs=1e-5)
        np.testing.assert_allclose([d.box.x1, d.box.y1, d.box.x2, d.box.y2], box, atol=1e-3)


def test_detect_encoded_equals_the_detector(client, detector, photos):
    img = photos["chelsea"]
    resp = client.detect_pb(png(img))
    assert (resp.width, resp.height) == (img.shape[1], img.shape[0])
    assert resp.model.name == "rtmdet-tiny"
    assert resp.timing.inference_ms > 0 and resp.timing.batch_size >= 1
    assert_same(resp, detector([img])[0])


def test_detect_raw_pixels_bgr_and_rgb(client, detector, photos):
    img = photos["coffee"]
    want = detector([img])[0]
    assert_same(client.detect_pb(img), want)
    assert_same(client.detect_pb(np.ascontiguousarray(img[..., ::-1]), rgb=True), want)


def test_params_and_json_shape_match_http(client, server, auth, photos):
    import httpx
    data = jpeg(photos["astronaut"])
    params = dict(score_threshold=0.305, max_detections=5, classes=["square", "circle"])
    via_grpc = client.detect(data, **params)
    via_http = httpx.post(f"{server.http}/detect", content=data, headers={"Content-Type": "image/jpeg", **auth},
                          params=params, timeout=60).json()
    assert len(via_grpc["detections"]) == 5
    for g, h in zip(via_grpc["detections"], via_http["detections"]):
        assert (g["label"], g["class_name"]) == (h["label"], h["class_name"])
        assert g["score"] == pytest.approx(h["score"], abs=2e-4)
        np.testing.assert_allclose(g["box"], h["box"], atol=0.02)
    assert set(via_grpc) == set(via_http) and set(via_grpc["timing"]) == set(via_http["timing"])


def test_stream_answers_every_frame_in_order(client, detector, photos):
    frames = [photos["coffee"], photos["chelsea"], photos["coffee"], photos["astronaut"]] * 2
    wants = detector(frames)
    got = list(client.detect_stream(frames))
    assert len(got) == len(frames)
    for g, w, f in zip(got, wants, frames):
        assert (g["width"], g["height"]) == (f.shape[1], f.shape[0])
        assert len(g["detections"]) == len(w)
        np.testing.assert_allclose([d["box"] for d in g["detections"]], w.boxes, atol=0.05)


def test_model_info(client, checkpoint):
    info = client.model()
    assert info["classes"] == CLASS_NAMES and info["input_size"] == INPUT_SIZE and info["backend"] == "torch"
    assert (info["runner"], info["runner_choice"]) == ("eager", "")
    assert info["canvas"] == "square"  # the official letterbox unless RTMDET_CANVAS says tight


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_bad_inputs_get_grpc_status_codes(client, photos):
    good = jpeg(photos["coffee"])
    assert code_of(lambda: client.detect(b""))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.detect(b"not an image at all" * 4))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.detect(good[:500]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.detect(b"GIF89a" + bytes(64)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.detect(good, classes=["dog"]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.stub.Detect(pb.DetectRequest(), metadata=client.metadata))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    bomb = __import__("cv2").imencode(".png", np.zeros((1500, 1500), np.uint8))[1].tobytes()
    code, details = code_of(lambda: client.detect(bomb))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pixels" in details
    raw = pb.DetectRequest(raw=pb.RawImage(data=b"\x00", height=2000, width=2000, channels=3))
    assert code_of(lambda: client.stub.Detect(raw, metadata=client.metadata))[0] == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    too_big = b"\xff\xd8\xff" + bytes(2 * 1024 * 1024)  # over the 1 MiB cap: refused by gRPC's message limit
    assert code_of(lambda: client.detect(too_big))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.detect(good)["width"] == 300  # still serving


def test_api_key_is_required(server, photos):
    with GrpcDetectorClient(server.grpc, api_key=None) as anon, GrpcDetectorClient(server.grpc, "wrong") as wrong:
        for c in (anon, wrong):
            assert code_of(lambda c=c: c.detect(jpeg(photos["coffee"])))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda c=c: list(c.detect_stream([photos["coffee"]])))[0] == \
                grpc.StatusCode.UNAUTHENTICATED
        # health stays open for probes
        health = health_pb2_grpc.HealthStub(anon.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="rtmdet.v1.Detector")).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"rtmdet.v1.Detector", "grpc.health.v1.Health"} <= names
        req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="rtmdet.v1.Detector")
        reply = next(refl.ServerReflectionInfo(iter([req])))
        assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can describe the service
