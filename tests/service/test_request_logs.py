"""Request ids and structured logs, against a real server with RTMDET_LOG_FORMAT=json: the id a client
sends (or one the server makes) comes back in the response and is in the request's JSON access line."""
from __future__ import annotations

import json
import re
import time

import grpc
import httpx
import pytest
from svc_helpers import ServerProcess, jpeg, serving

from service.client import GrpcDetectorClient


@pytest.fixture(scope="module")
def srv(checkpoint, tmp_path_factory):
    s = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "json.log", RTMDET_LOG_FORMAT="json",
                      RTMDET_WARMUP="false")
    with serving(s):
        yield s


def log_records(srv, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The JSON log lines of one request (the server writes the access line just after answering)."""
    end = time.monotonic() + timeout
    while True:
        lines = srv.log_path.read_text().splitlines()
        found = [json.loads(line) for line in lines if request_id in line]
        if found or time.monotonic() > end:
            return found
        time.sleep(0.1)


def test_http_request_id_is_echoed_and_in_the_json_access_line(srv, photos):
    r = httpx.post(f"{srv.http}/detect", content=jpeg(photos["coffee"]),
                   headers={"Content-Type": "image/jpeg", "X-Request-ID": "order-42.a"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "order-42.a"
    (line,) = log_records(srv, "order-42.a")
    assert line["request_id"] == "order-42.a" and line["level"] == "INFO" and line["logger"] == "rtmdet.access"
    assert (line["route"], line["status"], line["model"], line["protocol"]) == ("/detect", "200", "default", "http")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", line["time"])
    (stages,) = line["stages"]
    assert set(stages) == {"decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms", "batch_size"}
    assert stages["batch_size"] == 1 and stages["inference_ms"] > 0 and line["duration_ms"] >= stages["inference_ms"]


def test_http_request_id_is_made_when_missing_or_unusable(srv):
    for headers in ({}, {"X-Request-ID": "no spaces or \"quotes\" please"}):
        r = httpx.post(f"{srv.http}/detect", content=b"junk", headers={"Content-Type": "image/jpeg", **headers},
                       timeout=30)
        assert r.status_code == 400
        rid = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        (line,) = log_records(srv, rid)
        assert line["status"] == "400" and line["route"] == "/detect" and line["request_id"] == rid


def test_grpc_request_id_from_metadata_or_field_is_echoed_and_logged(srv, photos):
    with GrpcDetectorClient(srv.grpc, timeout=60) as c:
        reply, call = c.stub.Detect.with_call(c.request(jpeg(photos["coffee"])), timeout=60,
                                              metadata=(("x-request-id", "grpc-meta-7"),))
        assert reply.request_id == "grpc-meta-7" and ("x-request-id", "grpc-meta-7") in call.initial_metadata()
        reply, call = c.stub.Detect.with_call(c.request(jpeg(photos["coffee"]), request_id="grpc-field-8"), timeout=60)
        assert reply.request_id == "grpc-field-8" and ("x-request-id", "grpc-field-8") in call.initial_metadata()
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Detect(c.request(b"junk"), timeout=60, metadata=(("x-request-id", "grpc-bad-9"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-request-id", "grpc-bad-9") in err.value.initial_metadata()
    for rid, status in (("grpc-meta-7", "OK"), ("grpc-field-8", "OK"), ("grpc-bad-9", "INVALID_ARGUMENT")):
        (line,) = log_records(srv, rid)
        assert (line["protocol"], line["route"], line["status"]) == ("grpc", "/rtmdet.v1.Detector/Detect", status)
        assert line["model"] == "default" and line["request_id"] == rid


def test_every_log_line_is_one_json_object(srv):
    lines = [ln for ln in srv.log_path.read_text().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    # the server's own start-up lines are plain `rtmdet serve:` prints on stdout; nothing else is unstructured
    others = [ln for ln in srv.log_path.read_text().splitlines() if not ln.startswith(("{", "rtmdet serve:"))]
    assert others == []


def test_grpc_stream_has_one_call_id_and_one_access_line(srv, photos):
    frame = jpeg(photos["coffee"])
    with GrpcDetectorClient(srv.grpc, timeout=60) as c:
        call = c.stub.DetectStream(iter([c.request(frame, request_id="f0"), c.request(frame, request_id="f1")]),
                                   timeout=60, metadata=(("x-request-id", "stream-3"),))
        assert [r.request_id for r in call] == ["f0", "f1"]  # each frame echoes its own id
        assert ("x-request-id", "stream-3") in call.initial_metadata()
    (line,) = log_records(srv, "stream-3")
    assert (line["route"], line["status"], line["model"]) == ("/rtmdet.v1.Detector/DetectStream", "OK", "default")
    assert len(line["stages"]) == 2 and all(s["inference_ms"] > 0 for s in line["stages"])


def test_any_line_logged_during_a_request_carries_its_id(capsys):
    """The filter stamps every record written inside the request's scope, whichever logger writes it."""
    import logging

    from service import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("json")
    try:
        with logs.request_scope("scope-5", "http", "/detect"):
            logging.getLogger("rtmdet.somewhere").warning("inside")
        logging.getLogger("rtmdet.somewhere").warning("outside")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert inside["request_id"] == "scope-5" and inside["route"] == "/detect" and inside["message"] == "inside"
    assert "request_id" not in outside


def test_shed_requests_are_logged_at_most_once_a_second_with_the_count_left_out():
    from service.logs import _ShedLines

    lines = _ShedLines(period_s=0.2)
    assert lines.admit() == 0  # the first is logged
    assert [lines.admit() for _ in range(50)] == [None] * 50
    time.sleep(0.25)
    assert lines.admit() == 50  # the next line says how many were left out
