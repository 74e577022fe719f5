"""The request-head deadline (header slowloris) on a real uvicorn server on 127.0.0.1, for both parsers."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from svc_helpers import free_port, read_until_closed

from service.http_protocol import head_deadline_protocol

DEADLINE_S = 0.6


async def echo_app(scope, receive, send):
    """Answers with the number of body bytes it read (so a slow body is really waited for)."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request):
    port = free_port()
    config = uvicorn.Config(echo_app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            http=head_deadline_protocol(DEADLINE_S, request.param))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_a_head_trickled_past_the_deadline_gets_408_and_is_closed(server):
    sock = connect(server)
    t0 = time.monotonic()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(0.1)
    reply = b""
    while not reply and time.monotonic() - t0 < 5:
        try:
            sock.sendall(b"X")  # one header byte at a time, never finishing the head
        except OSError:
            break  # closed under us: the reply is already buffered
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            continue
    sock.settimeout(5)
    reply += read_until_closed(sock)
    elapsed = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"RTMDET_HEADER_TIMEOUT_S" in reply
    assert DEADLINE_S - 0.05 < elapsed < DEADLINE_S + 2.0, elapsed


def test_a_silent_connection_is_closed_at_the_deadline(server):
    sock = connect(server)
    t0 = time.monotonic()
    reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert DEADLINE_S - 0.05 < time.monotonic() - t0 < DEADLINE_S + 2.0


def test_keep_alive_requests_reset_the_deadline_and_the_next_head_has_it_too(server):
    sock = connect(server)
    for _ in range(3):  # each head arrives within the deadline; the connection lives longer than one deadline
        time.sleep(DEADLINE_S / 2)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200"), reply
    t0 = time.monotonic()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # then a head that never ends
    reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - t0 < DEADLINE_S + 2.0


def test_a_slow_body_is_not_cut_by_the_head_deadline(server):
    sock = connect(server)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):  # 8 bytes over about 2.5 deadlines: the body's own limit is the app's business
        time.sleep(DEADLINE_S / 3)
        sock.sendall(b"b")
    reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"8"), reply


def test_trickling_clients_do_not_delay_a_normal_one(server):
    tricklers = [connect(server) for _ in range(20)]
    try:
        for sock in tricklers:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        t0 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{server}/", content=b"abc", timeout=10)
        assert r.status_code == 200 and r.text == "3"
        assert time.monotonic() - t0 < DEADLINE_S  # answered before any trickler was even cut
        for sock in tricklers:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in tricklers:
            sock.close()


def test_unknown_parser_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown HTTP parser 'picohttp'"):
        head_deadline_protocol(1.0, "picohttp")
