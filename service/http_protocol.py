"""uvicorn's HTTP protocols with a deadline on the request head (request line + headers).

uvicorn bounds the idle time between requests (keep-alive) but not the time a client takes to send a request
head, and any byte received cancels even the keep-alive timer: a client that trickles a header byte every few
seconds holds its connection (and a file descriptor) for ever. Here a timer runs whenever the connection waits
for a head: from the moment it opens and again after each response. If the head is not complete in time the
client gets a 408 that says so and the connection is closed. The body has its own deadline in the app
(`RTMDET_REQUEST_TIMEOUT_S`), so a slow upload is bounded as well.

Both of uvicorn's parsers are covered: httptools (what uvicorn picks when it is installed) and h11.
"""
from __future__ import annotations

import asyncio
import importlib.util

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def timeout_response(seconds: float) -> bytes:
    body = (f"request line and headers did not arrive within {seconds:g} s "
            "(RTMDET_HEADER_TIMEOUT_S)\n").encode()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


class _HeadDeadline:
    """The timer, shared by both parsers' protocols; each says when a head is complete or awaited again."""

    head_timeout_s: float = 10.0
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_complete()
        super().connection_lost(exc)  # type: ignore[misc]

    def _head_complete(self) -> None:
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_head_timer(self) -> None:
        self._head_complete()
        self._awaiting_head = True
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        # Neither parser can answer a request it has not read, so this response is written as bytes.
        self.transport.write(timeout_response(self.head_timeout_s))
        self.transport.close()


class HeadDeadlineH11Protocol(_HeadDeadline, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        # Past IDLE the head has been parsed (h11 is reading the body, or the request is complete).
        if self.conn.their_state is not h11.IDLE:
            self._head_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # keep-alive: the next head has the same deadline


if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadDeadlineHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._head_complete()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A pipelined request whose head already arrived is now the current cycle; otherwise wait for one.
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()

    _DEFAULT: type[_HeadDeadline] = HeadDeadlineHttpToolsProtocol
else:  # pragma: no cover - uvicorn[standard] brings httptools
    _DEFAULT = HeadDeadlineH11Protocol


def head_deadline_protocol(seconds: float, parser: str = "auto") -> type:
    """The protocol class for uvicorn's `Config(http=...)` with this deadline; `parser`: auto, httptools, h11."""
    if parser not in ("auto", "httptools", "h11"):
        raise ValueError(f"unknown HTTP parser {parser!r}")
    base = HeadDeadlineH11Protocol if parser == "h11" else _DEFAULT
    if parser == "httptools" and base is HeadDeadlineH11Protocol:
        raise ValueError("httptools is not installed")
    return type(base.__name__, (base,), {"head_timeout_s": float(seconds)})
