"""A response written whole: its head and body leave the server in one send.

uvicorn writes a response's head and its body separately, and with uvloop each
write is its own `send` system call when the socket has room: two per
response, where one does (measured in BENCHMARKS.md, the tiny-model gap: the
second send was the largest single cost of a small response on the event
loop). Two ways to one send, both installed by `http_protocol.GuardedProtocol`
on each request:

- `OneSendResponses`, the request's view of the transport: any ASGI response
  through uvicorn's `send`; the head is held until the first body write.
- `respond`, offered to the app as the ASGI scope extension
  `RESPOND_EXTENSION` (`extension`): a complete response (status, header
  fields, body) in one call. ASGI's two messages go through starlette's
  `Response.__call__` and uvicorn's `send` (message dicts, header lower-casing
  and parsing, the Content-Length bookkeeping): 5.2 µs of the event loop for
  the digits MLP's answer, against 3.3 through `respond`
  (benchmarks/response_path_bench.py). The inference lane uses it; every other
  route keeps plain ASGI.

Neither needs httptools, so the lane can import the extension's name on a server
without it (where the extension is simply absent).
"""

from __future__ import annotations

import asyncio
import http
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

RESPOND_EXTENSION = "bnfold.respond"
"""The ASGI scope extension offering `respond`: `scope["extensions"][RESPOND_EXTENSION]`
is `{"respond": f}`, `f(status, fields, body)` being `respond` for this request."""

Respond = Callable[[int, Sequence[tuple[bytes, bytes]], bytes], bool]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Above this, a held head and the body go out by writelines (no joined copy of the body).
_JOIN_LIMIT = 64 * 1024

# uvicorn's own checks on a response's header fields (httptools_impl): a name is a token,
# a value holds no control character but tab, so no field can end the head early
_INVALID_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_INVALID_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in http.HTTPStatus
}


class OneSendResponses:
    """A request's view of the transport: the response head is held until the first body
    write, and both go out in one send.

    ASGI completes every response with a body message, even an empty one, so a
    held head always leaves, at the latest when the cycle closes the transport;
    the exception is HEAD, whose body uvicorn never writes, so HEAD requests keep
    the plain transport. A `100 Continue` is no response head and goes at once.
    """

    __slots__ = ("_head", "_head_passed", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._head_passed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head_passed:
            self._transport.write(data)
        elif self._head is not None:
            head, self._head = self._head, None
            self._head_passed = True
            if len(data) <= _JOIN_LIMIT:
                self._transport.write(head + bytes(data))
            else:
                self._transport.writelines((head, data))
        elif data == _CONTINUE:
            self._transport.write(data)
        else:  # the cycle's first write but a 100 Continue is its response head
            self._head = bytes(data)

    def close(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class Cycle(Protocol):
    """What `respond` reads and ends of uvicorn's request-response cycle (httptools_impl)."""

    scope: Any
    flow: Any
    access_log: bool
    access_logger: Any
    default_headers: list[tuple[bytes, bytes]]
    message_event: asyncio.Event
    disconnected: bool
    keep_alive: bool
    waiting_for_100_continue: bool
    response_started: bool
    response_complete: bool

    def on_response(self) -> None: ...


def respond(
    cycle: Cycle,
    transport: asyncio.Transport,
    status: int,
    fields: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> bool:
    """Answer `cycle`'s request whole: the status line, the server's default header fields,
    `fields`, Content-Length and the body in one write; then end the cycle as uvicorn's
    `send` ends it after the last body message. True if it did.

    False, with nothing written, where ASGI's `send` must answer instead: a
    response already begun, a client gone, a full write buffer (`send` waits for
    it to drain), or a status this table does not know. `fields` must not carry
    Content-Length, Transfer-Encoding or Connection: the length is the body's, and
    the connection closes when the cycle may not keep it alive (drain, shutdown,
    the client's `Connection: close`), as `send` decides. A field that could break
    the head raises RuntimeError, as in `send`.
    """
    status_line = _STATUS_LINES.get(status)
    if (
        status_line is None
        or cycle.response_started
        or cycle.disconnected
        or cycle.flow.write_paused
    ):
        return False
    content = [status_line]
    for name, value in (*cycle.default_headers, *fields):
        if _INVALID_NAME.search(name):
            raise RuntimeError("Invalid HTTP header name.")
        if _INVALID_VALUE.search(value):
            raise RuntimeError("Invalid HTTP header value.")
        content += (name, b": ", value, b"\r\n")
    content.append(b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content.append(b"\r\n")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if cycle.access_log:  # uvicorn's own access line (bnfold serve has its own instead)
        scope = cycle.scope
        cycle.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            status,
        )
    if len(body) <= _JOIN_LIMIT:
        content.append(body)
        transport.write(b"".join(content))
    else:
        transport.writelines((b"".join(content), body))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    return True


def extension(cycle: Cycle, transport: asyncio.Transport) -> dict[str, Respond]:
    """The scope extension's value for `cycle`'s request: `respond` for it.

    It holds the cycle weakly. The cycle holds the scope and the scope the
    extension, so a strong reference would make every request a reference cycle,
    freed (its scope, its body buffer) only by a garbage collection: under 256
    clients sending 128 KiB bodies the server grew by 390 MiB that way
    (tests/reliability/test_load.py caught it)."""
    cycle_ref = weakref.ref(cycle)

    def respond_to(status: int, fields: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
        answered = cycle_ref()
        return answered is not None and respond(answered, transport, status, fields, body)

    return {"respond": respond_to}
