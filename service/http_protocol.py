"""The HTTP/1.1 protocol `bnfold serve` runs: uvicorn's httptools protocol with a capped request head.

uvicorn buffers a request head without limit, and builds it by concatenation:
httptools joins the pieces of a header value (`bytes +=`) and uvicorn those of
the URL, one piece per read. A 64 MiB header held the event loop for 6 s, a
128 MiB one for 24 s (quadratic), and every other connection (health checks
included) waited meanwhile; its memory stayed (RELIABILITY.md: Security).

`HeadLimitedProtocol` counts the bytes of a request from its first byte to
the end of its head (request line and header fields), and the header fields.
A chunked body's trailer fields are header fields too (httptools hands them to
`on_header`, uvicorn adds them to the request's headers): they count with the
head's fields, and their bytes, from the last chunk's header on, get a budget
of their own. While a head or trailer section is incomplete the parser is fed
at most the bytes left in its budget, so no piece it concatenates grows past
the limit. Past either limit the client gets `431 Request Header Fields Too
Large` with the V2 error body `{"error": "..."}` naming the limit, and the
connection closes. Body bytes are not counted (`max_body_bytes` caps those).

A request refused in its head never reaches the app, nor does one refused in
its trailers while it waits behind an earlier response (uvicorn queues
pipelined requests; it is answered 431 in its turn). Otherwise a request
refused in its trailers is the app's already: the app is told the client
disconnected (its body would never end, so `request.stream()` would wait for
the client to go away), and the 431 goes out only if the app has written
nothing of its response; if it has, the connection just closes. The 431 goes
through no exception handler (the app has not seen the request, or no longer
listens), hence it is written here rather than by errors.py.

What may not be done: feed the parser bytes beyond the budget, even "just to
see whether the head ends there" -- that is the quadratic path again; and keep
limits on the class: with `--workers N` uvicorn pickles its config (this
protocol factory included) into N spawned processes, so the class must be
importable by name and the limits travel as an argument
(`functools.partial(HeadLimitedProtocol, limits=...)`, server_options.py).

Counting happens per piece fed: a body's bytes are fed a whole read at a time,
and when that read also holds the end of the body and a pipelined next head,
or the last chunk's header and trailer fields, those bytes go uncounted. So a
pipelined head or a trailer section can pass the byte limit by at most one
socket read -- 256 KiB with asyncio, 250 KiB with uvloop, whatever the limit --
bounded, which is what matters. (A pipelined head that starts inside a
counted piece passes it by less than one limit.) The field count has no slack.
"""

from __future__ import annotations

import asyncio
import functools
import http
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

LINGER_SECONDS = 2.0
"""How long a refused connection keeps reading (and discarding) before it closes.

Closing a socket with unread bytes makes the kernel send a reset, which can
destroy the 431 before the client reads it; a client still sending its head
when it is refused would see `connection reset` instead of the answer. So the
server half-closes after the 431 (FIN) and drains for at most this long, as
nginx's lingering close does; nothing read then reaches the parser.
"""

_TOO_LARGE = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


@dataclass(frozen=True)
class HeadLimits:
    """The largest request head in bytes (request line and header fields) and most fields."""

    max_bytes: int
    max_fields: int


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head or trailer past `limits` with a 431."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeadLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        # bytes fed since a message or chunk header began; None while body bytes flow
        self._counted_bytes: int | None = 0
        # the request whose body is being parsed: the app has it (None in a head)
        self._body_cycle: RequestResponseCycle | None = None
        self._refusal: str | None = None

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        unread = memoryview(data)
        while unread:
            if self._counted_bytes is None:
                piece, unread = unread, unread[:0]
            else:
                room = self.limits.max_bytes - self._counted_bytes
                if room <= 0:
                    fields = "request line and header fields"
                    if self._body_cycle is not None:
                        fields = "trailer fields"
                    self._refuse(f"the {fields} exceed {self.limits.max_bytes} bytes")
                    return
                piece, unread = unread[:room], unread[room:]
                self._counted_bytes += len(piece)
            super().data_received(piece)  # type: ignore[arg-type]
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # a 400 closed it, or uvicorn handed it to its WebSocket protocol
            if self._refusal is not None:
                self._refuse(self._refusal)
                return

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is not None:
            return
        if len(self.headers) >= self.limits.max_fields:
            self._refusal = f"the request has more than {self.limits.max_fields} header fields"
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._counted_bytes = None
        super().on_headers_complete()
        # a WebSocket upgrade makes no request: the app never sees it
        if self.cycle is not None and self.cycle.scope is self.scope:
            self._body_cycle = self.cycle

    def handle_websocket_upgrade(self) -> None:
        # httptools reports an upgrade after a refused head too; its scope is incomplete
        if self._refusal is None:
            super().handle_websocket_upgrade()

    def on_chunk_header(self) -> None:
        # the chunk's data or, after the last chunk, its trailer fields follow
        self._counted_bytes = 0

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            self._counted_bytes = None
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._counted_bytes = 0
        self._body_cycle = None
        super().on_message_complete()

    def _refuse(self, reason: str) -> None:
        """Refuse the request being parsed: a 431 if it is the next response due, then close.

        A head refused behind a response still in flight: that response ends
        the connection. A request refused in its trailers is the app's already:
        the app sees a disconnect, and the 431 goes out only if the app has
        written nothing. One still queued behind an earlier response never
        reaches the app: it is answered 431 in its turn.
        """
        self._refusal = reason
        self.logger.warning("Refused a request: %s.", reason)
        cycle = self._body_cycle
        if cycle is None:
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
                return
        elif self.pipeline:  # the newest request is the queue's first
            self.pipeline[0] = (cycle, functools.partial(answer_too_large, reason))
            return
        else:
            if not cycle.response_complete:
                cycle.disconnected = True  # its reads end, its writes go nowhere
            cycle.message_event.set()
        if cycle is None or not cycle.response_started:
            headers, body = too_large(reason)
            lines = [f"HTTP/1.1 {_TOO_LARGE.value} {_TOO_LARGE.phrase}\r\n".encode("ascii")]
            lines += [
                name + b": " + value + b"\r\n"
                for name, value in [*self.server_state.default_headers, *headers]
            ]
            self.transport.write(b"".join(lines) + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def too_large(reason: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers (besides the server's own) and V2 error body of a 431 refusing `reason`."""
    body = orjson.dumps({"error": reason})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    return headers, body


async def answer_too_large(reason: str, scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app answering 431 for `reason`: a refused request's turn in uvicorn's pipeline."""
    headers, body = too_large(reason)
    await send({"type": "http.response.start", "status": _TOO_LARGE.value, "headers": headers})
    await send({"type": "http.response.body", "body": body})
