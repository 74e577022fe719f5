"""Many images in one call, against a real server: several multipart `image` parts on HTTP, DetectBatch on
gRPC. Answers come in order, a bad image fails only its own entry, and the per-call cap holds."""
from __future__ import annotations

import grpc
import httpx
import pytest
from svc_helpers import ServerProcess, jpeg, serving

from service.client import GrpcDetectorClient

CAP = 3


@pytest.fixture(scope="module")
def srv(checkpoint, tmp_path_factory):
    s = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "many.log", RTMDET_MAX_IMAGES_PER_REQUEST=str(CAP),
                      RTMDET_MAX_QUEUE_DELAY_MS="100", RTMDET_MAX_BATCH_SIZE="8", RTMDET_WARMUP="false")
    with serving(s):
        yield s


@pytest.fixture(scope="module")
def images(photos) -> dict[str, bytes]:
    return {"coffee": jpeg(photos["coffee"]), "astronaut": jpeg(photos["astronaut"]), "bad": b"not an image at all"}


def post_parts(url: str, parts: list[bytes]) -> httpx.Response:
    return httpx.post(url, files=[("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(parts)], timeout=60)


def post_one(url: str, image: bytes) -> httpx.Response:
    return httpx.post(url, content=image, headers={"Content-Type": "image/jpeg"}, timeout=60)


def boxes(answer: dict) -> list:
    return [d["box"] for d in answer["detections"]]


@pytest.mark.parametrize("route", ["/detect", "/v1/models/default/detect"])
def test_several_parts_answer_a_list_in_order_and_a_bad_image_fails_alone(srv, images, route):
    one = {name: post_one(f"{srv.http}/detect", images[name]).json()
           for name in ("coffee", "astronaut")}
    r = post_parts(f"{srv.http}{route}", [images["coffee"], images["bad"], images["astronaut"]])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert isinstance(answer, list) and len(answer) == 3
    assert (answer[0]["width"], answer[2]["width"]) == (300, 512)
    assert boxes(answer[0]) == boxes(one["coffee"]) and boxes(answer[2]) == boxes(one["astronaut"])
    assert answer[1]["error"]["status"] == 400 and answer[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert answer[1]["error"]["detail"]


def test_images_of_one_call_share_batches(srv, images):
    answer = post_parts(f"{srv.http}/detect", [images["coffee"]] * CAP).json()
    assert max(a["timing"]["batch_size"] for a in answer) >= 2, [a["timing"] for a in answer]


def test_one_part_keeps_the_single_object_answer(srv, images):
    answer = post_parts(f"{srv.http}/detect", [images["coffee"]]).json()
    assert isinstance(answer, dict) and answer["width"] == 300 and answer["detections"]


@pytest.mark.parametrize("count", [CAP + 1, CAP + 5])
def test_more_images_than_the_cap_is_413(srv, images, count):
    r = post_parts(f"{srv.http}/detect", [images["coffee"]] * count)
    assert r.status_code == 413 and "RTMDET_MAX_IMAGES_PER_REQUEST" in r.json()["detail"]
    assert post_one(f"{srv.http}/detect", images["coffee"]).status_code == 200


def test_grpc_detect_batch_answers_each_entry(srv, images):
    with GrpcDetectorClient(srv.grpc, timeout=60) as c:
        pb = c.pb
        reqs = [c.request(images["coffee"], request_id="a"), c.request(images["bad"], request_id="b"),
                pb.DetectRequest(request_id="c"), c.request(images["astronaut"], request_id="d")]
        with pytest.raises(grpc.RpcError) as err:  # four entries: past the cap of three
            c.stub.DetectBatch(pb.DetectBatchRequest(requests=reqs), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "RTMDET_MAX_IMAGES_PER_REQUEST" in err.value.details()
        reply, call = c.stub.DetectBatch.with_call(pb.DetectBatchRequest(requests=reqs[:2] + reqs[3:]), timeout=60,
                                                   metadata=(("x-request-id", "batch-call-1"),))
        http_answer = post_one(f"{srv.http}/detect", images["astronaut"]).json()
        empty = None
        with pytest.raises(grpc.RpcError) as err:
            empty = c.stub.DetectBatch(pb.DetectBatchRequest(), timeout=60)
        assert empty is None and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.request_id == "batch-call-1" and ("x-request-id", "batch-call-1") in call.initial_metadata()
    kinds = [e.WhichOneof("outcome") for e in reply.entries]
    assert kinds == ["result", "error", "result"]
    assert reply.entries[1].error.code_name == "INVALID_ARGUMENT" and reply.entries[1].error.http_status == 400
    assert reply.entries[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [e.result.request_id for e in reply.entries if e.HasField("result")] == ["a", "d"]
    got = [[round(v, 2) for v in (d.box.x1, d.box.y1, d.box.x2, d.box.y2)] for d in reply.entries[2].result.detections]
    assert got == boxes(http_answer)
