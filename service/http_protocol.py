"""The HTTP/1.1 protocol `bnfold serve` runs: uvicorn's httptools protocol with a capped request head.

uvicorn buffers a request head without limit, and builds it by concatenation:
httptools joins the pieces of a header value (`bytes +=`) and uvicorn those of
the URL, one piece per read. A 64 MiB header held the event loop for 6 s, a
128 MiB one for 24 s (quadratic), and every other connection (health checks
included) waited meanwhile; its memory stayed (RELIABILITY.md: Security).

`HeadLimitedProtocol` counts the bytes of a request from its first byte to
the end of its head (request line and header fields) and the header fields.
While a head is incomplete the parser is fed at most the bytes left in that
budget, so no piece it concatenates grows past the limit. Past either limit
the request never reaches the app: the client gets `431 Request Header Fields
Too Large` with the V2 error body `{"error": "..."}` naming the limit, and the
connection closes. Body bytes are not counted (`max_body_bytes` caps those).

What may not be done: feed the parser bytes beyond the budget, even "just to
see whether the head ends there" -- that is the quadratic path again; and keep
limits on the class: with `--workers N` uvicorn pickles its config (this
protocol factory included) into N spawned processes, so the class must be
importable by name and the limits travel as an argument
(`functools.partial(HeadLimitedProtocol, limits=...)`, server_options.py).

Counting happens per received piece: when one read completes a request and
starts a pipelined next one, the next head's bytes in that read go uncounted,
so a pipelined head can pass the limit by at most one limit -- bounded, which
is what matters. The 431 goes through no exception handler (the app never sees
the request), hence its body is written here rather than by errors.py.
"""

from __future__ import annotations

import asyncio
import http
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
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
    """uvicorn's httptools protocol, refusing a request head past `limits` with a 431."""

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
        self._head_bytes: int | None = 0  # None once the head is complete: body bytes flow
        self._refusal: str | None = None

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        received = memoryview(data)
        while self._head_bytes is not None and received:
            room = self.limits.max_bytes - self._head_bytes
            if room <= 0:
                self._refuse(
                    f"the request line and header fields exceed {self.limits.max_bytes} bytes"
                )
                return
            piece, received = received[:room], received[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)  # type: ignore[arg-type]
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # a 400 closed it, or uvicorn handed it to its WebSocket protocol
        if received:
            super().data_received(received)  # type: ignore[arg-type]

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
        self._head_bytes = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._head_bytes = 0
        super().on_message_complete()

    def _refuse(self, reason: str) -> None:
        """Answer 431 and close; after a response still in flight, only close."""
        self._refusal = reason
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # its response ends the connection
            return
        self.logger.warning("Refused a request head: %s.", reason)
        body = orjson.dumps({"error": reason})
        head = [f"HTTP/1.1 {_TOO_LARGE.value} {_TOO_LARGE.phrase}\r\n".encode("ascii")]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
