"""The Python clients (sync and async, HTTP and gRPC) and `rtmdet client`, against one real server that is easy
to overload: batches of one and a queue of one, so a few concurrent requests get real 503 / RESOURCE_EXHAUSTED
answers (with `Retry-After: 1` on HTTP) and the retries are the clients' own."""
from __future__ import annotations

import asyncio
import gc
import json
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from svc_helpers import API_KEY, REPO, ServerProcess, free_port
from test_load import samples, value

from service.cli import main as rtmdet_main
from service.client import (
    AsyncGrpcDetectorClient,
    AsyncHttpDetectorClient,
    BadRequest,
    DeadlineExceeded,
    GrpcDetectorClient,
    HttpDetectorClient,
    RetryPolicy,
    Unavailable,
)
from service.client_cli import InputError, expand_inputs

EXAMPLES = REPO / "examples"
SHAPES = EXAMPLES / "shapes.jpg"
SHIPPED_WEIGHTS = REPO / "weights" / "rtmdet_tiny_shapes.pth"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """The shipped shapes model (it finds real boxes in examples/shapes.jpg); batch 1, queue 1, 1 MiB uploads."""
    with ServerProcess(SHIPPED_WEIGHTS, tmp_path_factory.mktemp("logs") / "clients.log", RTMDET_API_KEY=API_KEY,
                       RTMDET_MAX_BATCH_SIZE="1", RTMDET_MAX_QUEUE_SIZE="1", RTMDET_MAX_QUEUE_DELAY_MS="0",
                       RTMDET_MAX_UPLOAD_BYTES=str(1024 * 1024), OMP_NUM_THREADS="1") as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def expected(srv) -> dict:
    """POST /detect's own JSON for shapes.jpg, as a plain HTTP call."""
    r = httpx.post(f"{srv.http}/detect", content=SHAPES.read_bytes(), timeout=60,
                   headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["detections"]) >= 3  # real boxes, or the comparisons below would prove little
    return body


def same_answer(got: dict, want: dict) -> bool:
    return {k: v for k, v in got.items() if k != "timing"} == {k: v for k, v in want.items() if k != "timing"}


def http_sync(srv, **kw):
    return HttpDetectorClient(srv.http, api_key=API_KEY, **kw)


def grpc_sync(srv, **kw):
    return GrpcDetectorClient(srv.grpc, api_key=API_KEY, **kw)


def test_all_four_clients_answer_what_post_detect_answers(srv, expected):
    with http_sync(srv) as h, grpc_sync(srv) as g:
        assert same_answer(h.detect(SHAPES), expected)
        assert same_answer(g.detect(SHAPES), expected)
        assert same_answer(g.detect(SHAPES.read_bytes()), expected)
        assert h.model()["classes"] == g.model()["classes"]

    async def both():
        async with AsyncHttpDetectorClient(srv.http, api_key=API_KEY) as h, \
                AsyncGrpcDetectorClient(srv.grpc, api_key=API_KEY) as g:
            return await h.detect(SHAPES), await g.detect(SHAPES), await h.model(), await g.model()

    via_http, via_grpc, model_http, model_grpc = asyncio.run(both())
    assert same_answer(via_http, expected) and same_answer(via_grpc, expected)
    assert model_http["classes"] == model_grpc["classes"]


def test_bad_image_fails_only_its_own_entry(srv, expected):
    images = [SHAPES, b"not an image at all", ("coffee", (EXAMPLES / "coffee.jpg").read_bytes()),
              EXAMPLES / "missing.jpg", str(SHAPES)]

    def check(results, protocol_status):
        assert [r.index for r in results] == [0, 1, 2, 3, 4]  # input order
        assert [r.name for r in results] == [str(SHAPES), "#1", "coffee", str(EXAMPLES / "missing.jpg"), str(SHAPES)]
        assert [r.ok for r in results] == [True, False, True, False, True]
        assert same_answer(results[0].response, expected) and same_answer(results[4].response, expected)
        err = results[1].error
        assert isinstance(err, BadRequest) and err.status == protocol_status and "not an image" in err.message
        assert isinstance(results[3].error, FileNotFoundError)
        assert results[2].response["width"] > 0
        line = results[1].to_json()
        assert line["file"] == "#1" and "not an image" in line["error"] and line["status"] == protocol_status

    async def run_async():
        async with AsyncHttpDetectorClient(srv.http, api_key=API_KEY) as h, \
                AsyncGrpcDetectorClient(srv.grpc, api_key=API_KEY) as g:
            via_http = [r async for r in h.detect_many(images, concurrency=4)]
            via_grpc = [r async for r in g.detect_many(images, concurrency=4)]
            unordered = [r async for r in g.detect_many(images, concurrency=4, ordered=False)]
            return via_http, via_grpc, unordered

    via_http, via_grpc, unordered = asyncio.run(run_async())
    check(via_http, 400)
    check(via_grpc, "INVALID_ARGUMENT")
    check(sorted(unordered, key=lambda r: r.index), "INVALID_ARGUMENT")
    with http_sync(srv) as h, grpc_sync(srv) as g:  # the sync wrappers
        check(list(h.detect_many(images, concurrency=4)), 400)
        check(list(g.detect_many(images, concurrency=4)), "INVALID_ARGUMENT")


def test_refusals_are_never_retried_and_keep_their_old_faces(srv):
    too_big = b"\xff\xd8\xff" + bytes(2 * 1024 * 1024)  # over the 1 MiB cap
    retries = []
    policy = RetryPolicy(max_attempts=5, on_retry=retries.append)
    with http_sync(srv, retry=policy) as h, grpc_sync(srv, retry=policy) as g, \
            HttpDetectorClient(srv.http, api_key="wrong", retry=policy) as wrong:
        with pytest.raises(BadRequest) as http_big:
            h.detect(too_big)
        with pytest.raises(BadRequest) as grpc_big:  # RESOURCE_EXHAUSTED, but not a full queue
            g.detect(too_big)
        with pytest.raises(BadRequest) as unauthorized:
            wrong.detect(SHAPES)
        with pytest.raises(BadRequest) as unknown_class:
            g.detect(SHAPES, classes=["dog"])
    assert retries == []
    assert http_big.value.status == 413 and http_big.value.attempts == 1
    assert grpc_big.value.status == "RESOURCE_EXHAUSTED" and grpc_big.value.attempts == 1
    assert unauthorized.value.status == 401 and "API key" in unauthorized.value.message
    assert unknown_class.value.status == "INVALID_ARGUMENT" and "dog" in unknown_class.value.message
    # Code written against the plain clients still catches them as before.
    assert isinstance(http_big.value, httpx.HTTPStatusError) and http_big.value.response.status_code == 413
    assert isinstance(grpc_big.value, grpc.RpcError) and grpc_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # They pickle (to another process) as their plain kind.
    copy = pickle.loads(pickle.dumps(http_big.value))
    assert type(copy) is BadRequest and (copy.status, copy.message) == (413, http_big.value.message)


def test_no_server_is_retried_then_unavailable():
    """A refused connection (HTTP ConnectError, gRPC UNAVAILABLE while connecting) is retried, then raised."""
    port = free_port()  # nothing listens there
    for make in (lambda p: HttpDetectorClient(f"http://127.0.0.1:{port}", retry=p),
                 lambda p: GrpcDetectorClient(f"127.0.0.1:{port}", retry=p)):
        events = []
        policy = RetryPolicy(max_attempts=3, backoff_s=0.01, max_backoff_s=0.02, on_retry=events.append)
        with make(policy) as client, pytest.raises(Unavailable) as err:
            client.detect(SHAPES, timeout=10)
        assert err.value.attempts == 3 and [e.attempt for e in events] == [1, 2]
        assert err.value.status in (None, "UNAVAILABLE")


def test_stopping_detect_many_early_leaves_nothing_running(srv, caplog):
    with http_sync(srv) as h, grpc_sync(srv) as g:
        for client in (h, g):
            results = client.detect_many([SHAPES] * 6, concurrency=3)
            assert next(results).ok
            results.close()  # the calls still in flight are cancelled and awaited, their loop closed
        gc.collect()
        assert h.detect(SHAPES)["detections"] and g.detect(SHAPES)["detections"]
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


def overload_counts(srv) -> tuple[float, float]:
    snap = samples(srv.http)
    return (value(snap, "rtmdet_requests_total", protocol="http", endpoint="/detect", status="503"),
            value(snap, "rtmdet_requests_total", protocol="grpc", endpoint="Detect", status="RESOURCE_EXHAUSTED"))


def test_http_503_is_retried_after_retry_after(srv, expected):
    events = []
    policy = RetryPolicy(max_attempts=20, on_retry=events.append)

    async def burst():
        async with AsyncHttpDetectorClient(srv.http, api_key=API_KEY, retry=policy) as h:
            return await asyncio.gather(*[h.detect(SHAPES) for _ in range(8)])

    before = overload_counts(srv)[0]
    t0 = time.monotonic()
    answers = asyncio.run(burst())
    with http_sync(srv, retry=policy) as h, ThreadPoolExecutor(6) as pool:  # the sync client, from threads
        answers += list(pool.map(lambda _: h.detect(SHAPES), range(6)))
    elapsed = time.monotonic() - t0
    refused = overload_counts(srv)[0] - before
    assert all(same_answer(a, expected) for a in answers)  # everyone got through in the end
    assert refused >= 1 and len(events) == refused  # every real 503 was retried, nothing else was
    assert all(e.error.status == 503 and e.error.retry_after == 1.0 and e.delay_s >= 1.0 for e in events)
    assert elapsed >= 1.0


def test_grpc_resource_exhausted_is_retried_after_its_retry_after_trailer(srv, expected):
    events = []
    policy = RetryPolicy(max_attempts=30, backoff_s=0.05, max_backoff_s=0.4, on_retry=events.append)

    async def burst():
        async with AsyncGrpcDetectorClient(srv.grpc, api_key=API_KEY, retry=policy) as g:
            return await asyncio.gather(*[g.detect(SHAPES) for _ in range(8)])

    before = overload_counts(srv)[1]
    answers = asyncio.run(burst())
    with grpc_sync(srv, retry=policy) as g, ThreadPoolExecutor(6) as pool:
        answers += list(pool.map(lambda _: g.detect(SHAPES), range(6)))
    refused = overload_counts(srv)[1] - before
    assert all(same_answer(a, expected) for a in answers)
    assert refused >= 1 and len(events) == refused
    for e in events:  # a full queue sends its Retry-After (1 s) as a `retry-after` trailer: honoured, +0-20%
        assert e.error.status == "RESOURCE_EXHAUSTED" and e.error.retry_after == 1.0
        assert 1.0 <= e.delay_s <= 1.2


def wait_until_idle(srv, timeout: float = 30.0) -> None:
    """Until no detect request is in flight: a call that gave up after 1 ms leaves its request on the server a
    little longer, and with a queue of one the next call would find it full (RESOURCE_EXHAUSTED, not a deadline)."""
    end = time.monotonic() + timeout
    while value(samples(srv.http), "rtmdet_requests_in_flight") > 0:
        assert time.monotonic() < end, "the server kept a request in flight for 30 s"
        time.sleep(0.02)


def test_deadlines_give_a_clear_timeout_error(srv):
    def timed(call):
        wait_until_idle(srv)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as err:
            call()
        return err.value, time.monotonic() - t0

    with http_sync(srv) as h, grpc_sync(srv) as g:
        for call in (lambda: h.detect(SHAPES, timeout=0.001), lambda: g.detect(SHAPES, timeout=0.001)):
            err, took = timed(call)
            assert isinstance(err, TimeoutError) and "deadline" in str(err).lower() and took < 1.0, (err, took)

    async def short_calls():
        async with AsyncHttpDetectorClient(srv.http, api_key=API_KEY) as h, \
                AsyncGrpcDetectorClient(srv.grpc, api_key=API_KEY) as g:
            for call in (h.detect(SHAPES, timeout=0.001), g.detect(SHAPES, timeout=0.001)):
                await asyncio.to_thread(wait_until_idle, srv)
                with pytest.raises(DeadlineExceeded):
                    await call
            # Under overload a Retry-After of 1 s does not fit a 0.5 s deadline: a refused call gives up at
            # once with the server's answer instead of waiting past its deadline.
            t0 = time.monotonic()
            outcomes = await asyncio.gather(*[h.detect(SHAPES, timeout=0.5) for _ in range(8)],
                                            return_exceptions=True)
            return outcomes, time.monotonic() - t0

    outcomes, took = asyncio.run(short_calls())
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert refused and all(isinstance(o, Unavailable | DeadlineExceeded) for o in refused), outcomes
    assert any(isinstance(o, Unavailable) and o.status == 503 and o.attempts == 1 for o in refused), outcomes
    assert took < 2.0, took  # 0.5 s deadlines; nobody slept the 1 s Retry-After


def client_args(srv, protocol: str) -> list[str]:
    return ["client", "--protocol", protocol, "--url", srv.http, "--target", srv.grpc, "--api-key", API_KEY]


def test_rtmdet_client_over_both_protocols_writes_one_line_per_image(srv, expected, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # `rtmdet client examples/ --concurrency 8` as typed in the repo (in-process: no startup)
    for protocol in ("http", "grpc"):
        assert rtmdet_main([*client_args(srv, protocol), "examples/", "--concurrency", "8"]) == 0
        out, err = capsys.readouterr()
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["file"] for line in lines] == [f"examples/{n}.jpg" for n in ("astronaut", "coffee", "shapes")]
        assert all("detections" in line for line in lines)
        assert lines[2]["detections"] == expected["detections"]
        assert "rtmdet client: 3 images, 3 ok, 0 failed" in err


def test_rtmdet_client_coco_results_and_a_failing_image(srv, expected, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(SHAPES, folder / "a.jpg")
    (folder / "b.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an input")
    classes = httpx.get(f"{srv.http}/v1/model", headers={"Authorization": f"Bearer {API_KEY}"}).json()["classes"]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.png"}],
                               "categories": [{"id": 10 + i, "name": n} for i, n in enumerate(classes)]}))
    lines, coco = tmp_path / "out.jsonl", tmp_path / "results.json"
    rc = rtmdet_main([*client_args(srv, "http"), str(folder), "--out", str(lines), "--coco-results", str(coco),
                      "--coco-ann", str(ann), "--concurrency", "2"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "rtmdet client: 2 images, 1 ok, 1 failed" in err and "b.png" in err
    got = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [g["file"] for g in got] == [str(folder / "a.jpg"), str(folder / "b.png")]
    assert got[0]["detections"] == expected["detections"] and got[1]["status"] == 400
    results = json.loads(coco.read_text())
    assert len(results) == len(expected["detections"])
    for r, d in zip(results, expected["detections"]):
        x1, y1, x2, y2 = d["box"]
        assert r["image_id"] == 7 and r["category_id"] == 10 + classes.index(d["class_name"])
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.011) and r["score"] == d["score"]

    # Without annotations: a running index and label + 1; the good file alone exits 0.
    assert rtmdet_main([*client_args(srv, "grpc"), str(folder / "a.jpg"), "--coco-results", str(coco)]) == 0
    assert capsys.readouterr().out == ""
    results = json.loads(coco.read_text())
    assert {r["image_id"] for r in results} == {1}
    assert [r["category_id"] for r in results] == [d["label"] + 1 for d in expected["detections"]]


def test_rtmdet_client_refuses_unusable_inputs_before_sending(srv, tmp_path, capsys):
    assert rtmdet_main([*client_args(srv, "http"), str(tmp_path / "nope.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert rtmdet_main([*client_args(srv, "http"), str(tmp_path / "*.jpg")]) == 2
    assert "no file matches" in capsys.readouterr().err
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "categories": []}))
    assert rtmdet_main([*client_args(srv, "http"), str(SHAPES), "--coco-results", str(tmp_path / "r.json"),
                        "--coco-ann", str(ann)]) == 2
    assert "not among the images" in capsys.readouterr().err


def test_inputs_expand_from_folders_globs_and_files_once_each(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "a.PNG", tmp_path / "b.jpg"]  # by suffix, sorted, not deep
    assert expand_inputs([str(tmp_path / "**" / "*.webp"), str(tmp_path / "notes.txt"), str(tmp_path / "*.jpg"),
                          str(tmp_path / "b.jpg")]) == [tmp_path / "sub" / "c.webp", tmp_path / "notes.txt",
                                                         tmp_path / "b.jpg"]
    with pytest.raises(InputError, match="no image files"):
        expand_inputs([str(tmp_path / "empty")])
