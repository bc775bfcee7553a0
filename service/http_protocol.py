"""The HTTP/1.1 protocol `bnfold serve` runs: uvicorn's httptools protocol, guarded.

uvicorn bounds a request in size nowhere and in time only between requests
(its keep-alive timer). `GuardedProtocol` adds, per connection:

- a cap on the request head (431), below;
- a header timeout: the head must arrive within `header_timeout_seconds` of
  the connection opening or of its first byte (408);
- a body timeout: the body must arrive within `body_timeout_seconds` of the
  head's end (408);
- a connection limit: a request on a connection opened past `max_connections`
  gets 503 with `Retry-After: 1`;
- the drain hooks (drain.py): while draining, each response closes its
  connection, and at shutdown a request partly received is finished first;
- one send per response (whole_response.py): the request's transport holds the
  head for the body, and the scope offers the app `respond` for a whole answer.

A refusal (431, 408, 503) carries the V2 error body `{"error": "..."}` naming
the limit and `Connection: close`, and goes through no exception handler (the
app has not seen the request, or no longer listens), hence it is written here
rather than by errors.py. The server then half-closes and drains for
`LINGER_SECONDS`, so the client reads the answer rather than a reset. Refusals
are logged as WARNINGs, at most one a second per status (`RefusalLog`): a
flood of slow clients must not flood the log too.

Why here and not in an ASGI middleware: the app first hears of a request when
its head is complete, so a head that never ends, or a connection that never
sends, never reaches it. Why not uvicorn's own knobs: it has no header or body
read timeouts, and `limit_concurrency` answers text/plain without
`Retry-After` and counts running tasks with connections (a burst of requests
on few connections trips it), and it refuses requests on old connections as
well as new ones. The h11 fallback (no httptools) has none of this: no
timeouts, no connection limit, no drain hooks; only uvicorn's keep-alive timer
and its cap on an incomplete head (`h11_max_incomplete_event_size`, a 400).

**The head cap.** uvicorn buffers a request head without limit, and builds it
by concatenation: httptools joins the pieces of a header value (`bytes +=`)
and uvicorn those of the URL, one piece per read. A 64 MiB header held the
event loop for 6 s, a 128 MiB one for 24 s (quadratic), and every other
connection (health checks included) waited meanwhile; its memory stayed
(RELIABILITY.md: Security). So the bytes of a request are counted from its
first byte to the end of its head (request line and header fields), and the
header fields. A chunked body's trailer fields are header fields too
(httptools hands them to `on_header`, uvicorn adds them to the request's
headers): they count with the head's fields, and their bytes, from the last
chunk's header on, get a budget of their own. While a head or trailer section
is incomplete the parser is fed at most the bytes left in its budget, so no
piece it concatenates grows past the limit. Body bytes are not counted
(`max_body_bytes` caps those).

**Whose request is refused.** A request refused in its head never reaches the
app; behind a response still in flight it gets no answer: that response
closes the connection. One refused in its trailers or body while it waits
behind an earlier response (uvicorn queues pipelined requests) is answered in
its turn. Otherwise a request refused in its trailers or body is the app's
already: the app is told the client disconnected (its body would never end,
so `request.stream()` would wait for the client to go away; a disconnect ends
the request as a 400 without a traceback), and the answer goes out only if
the app has written nothing of its response; if it has, the connection just
closes.

**The clocks.** Both timeouts run on a clock that stops while uvicorn has
paused reading the socket (`ReadClock`): it does when the app has not taken
64 KiB of body yet, or when a pipelined request waits for the response before
it. The client cannot send then, so the server's own slowness is never
charged to it; the client's share of a deadline still is. Timers are armed
only when a head or body outlives the read it started in, so a request that
arrives in one read (most do) costs no timer.

**The keep-alive timer, armed once.** uvicorn arms a timer each time a
response completes (`loop.call_later`, an idle connection closes after
`timeout_keep_alive`) and cancels it when the next request's bytes come: a
timer made and cancelled per request, 1.4-2.8 µs of the event loop's time with
uvloop. Here the response only notes when the connection went idle, and one
timer per connection checks, when it fires, whether it has been idle that
long, else waits for the rest (`_keep_alive_deadline`). The connection closes
at the same moment as uvicorn's would.

**The connection limit.** A connection is admitted if, when it opens, this
process has at most `max_connections` open connections (itself included);
one that was not is admitted at its first head if the count has fallen back
by then, else refused with 503 (uvicorn's `limit_concurrency` decides at the
head too, so a client that never sends is bounded by the header timeout, not
by this). Admitted connections stay admitted, so at most `max_connections`
are ever served at once and a flood of new ones does not refuse the old ones.

**Drain.** While the app's `DrainState` (drain.py) says draining, each request
whose head completes gets `Connection: close`. uvicorn calls `shutdown()` on
every connection when it stops: one with a request partly received (a head
begun, a body in progress, or a response in flight) finishes that request and
then closes (the timeouts bound the wait); one with nothing received closes.

What may not be done: feed the parser bytes beyond the budget, even "just to
see whether the head ends there" -- that is the quadratic path again; and keep
limits on the class: with `--workers N` uvicorn pickles its config (this
protocol factory included) into N spawned processes, so the class must be
importable by name and the limits travel as arguments
(`functools.partial(GuardedProtocol, limits=..., refusal_log=...)`,
server_options.py): each process unpickles its own `RefusalLog`.

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
import enum
import functools
import http
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from bnfold.service.drain import DRAIN_STATE_KEY, DrainState
from bnfold.service.whole_response import RESPOND_EXTENSION, OneSendResponses, extension

LINGER_SECONDS = 2.0
"""How long a refused connection keeps reading (and discarding) before it closes.

Closing a socket with unread bytes makes the kernel send a reset, which can
destroy the refusal before the client reads it; a client still sending its
head when it is refused would see `connection reset` instead of the answer. So
the server half-closes after the refusal (FIN) and drains for at most this
long, as nginx's lingering close does; nothing read then reaches the parser.
"""

RETRY_AFTER_SECONDS = 1
"""What a 503 for the connection limit asks the client to wait: connections turn over fast."""

_TOO_LARGE = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
_TIMEOUT = http.HTTPStatus.REQUEST_TIMEOUT
_UNAVAILABLE = http.HTTPStatus.SERVICE_UNAVAILABLE


@dataclass(frozen=True)
class HeadLimits:
    """The largest request head in bytes (request line and header fields) and most fields."""

    max_bytes: int
    max_fields: int


@dataclass(frozen=True)
class ClientLimits:
    """What a client may take of this process: head size, time for a head and a body,
    and connections."""

    head: HeadLimits
    header_timeout_seconds: float
    body_timeout_seconds: float
    max_connections: int


@dataclass(frozen=True)
class Refusal:
    """A request refused before the app could answer it: the status, why (the client reads
    it) and the headers besides Content-Type, Content-Length and Connection."""

    status: http.HTTPStatus
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def response(self) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The headers (besides the server's own) and the V2 error body."""
        body = orjson.dumps({"error": self.reason})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            *self.headers,
        ]
        return headers, body


@dataclass
class RefusalLog:
    """Refusal warnings, at most one per status every `interval_seconds` in this process,
    each saying how many were held back since the last.

    One per process (server_options.py makes one per protocol factory; each worker
    unpickles its own), shared by its connections.
    """

    interval_seconds: float = 1.0
    _last: dict[int, float] = field(default_factory=dict, repr=False)
    _held: dict[int, int] = field(default_factory=dict, repr=False)

    def warn(self, logger: logging.Logger, refusal: Refusal) -> None:
        status, now = refusal.status.value, time.monotonic()
        if now - self._last.get(status, -self.interval_seconds) < self.interval_seconds:
            self._held[status] = self._held.get(status, 0) + 1
            return
        self._last[status] = now
        held = self._held.pop(status, 0)
        also = f" (and {held} more since the last such warning)" if held else ""
        logger.warning("Refused a request with %d: %s%s.", status, refusal.reason, also)


class ReadClock(FlowControl):
    """uvicorn's flow control, plus a clock (seconds) that stops while reading is paused.

    uvicorn pauses reading when the app leaves 64 KiB of body untaken, or when
    a pipelined request waits behind a response: the client cannot send then,
    so that time is not the client's (the timeouts run on this clock).
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport)
        self._loop = loop
        self._paused_seconds = 0.0
        self._paused_at = 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused_at = self._loop.time()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self._paused_seconds += self._loop.time() - self._paused_at
        super().resume_reading()

    def now(self) -> float:
        stopped_at = self._paused_at if self.read_paused else self._loop.time()
        return stopped_at - self._paused_seconds


class _Phase(enum.Enum):
    IDLE = enum.auto()  # between requests (stray bytes may have come)
    HEAD = enum.auto()  # a request line has begun
    BODY = enum.auto()  # the head is complete, the message not yet


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounding a client's head, body, time and connections."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ClientLimits,
        refusal_log: RefusalLog,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.refusal_log = refusal_log
        self.clock: ReadClock = None  # type: ignore[assignment]
        # bytes fed since a message or chunk header began; None while body bytes flow
        self._counted_bytes: int | None = 0
        # the request whose body is being parsed: the app has it (None in a head)
        self._body_cycle: RequestResponseCycle | None = None
        self._refusal: Refusal | None = None
        self._phase = _Phase.IDLE
        self._admitted = False
        self._shutting_down = False
        # when the running deadlines began, on `self.clock` (None: not running)
        self._head_began: float | None = None
        self._body_began: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        # when the connection last went idle after a response (None: not idle), on the loop's
        # clock; the timer that closes it once idle for `timeout_keep_alive`
        self._idle_since: float | None = None
        self._keep_alive_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.clock = ReadClock(transport, self.loop)
        self.flow = self.clock
        self._admitted = len(self.connections) <= self.limits.max_connections
        # a connection that never sends: its head's clock runs from the start
        self._head_began = self.clock.now()
        self._head_timer = self.loop.call_later(
            self.limits.header_timeout_seconds, self._head_deadline
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        self._idle_since = None
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn stops: finish a request partly received, then close; else close now.

        uvicorn's own closes a connection whose response is complete even when
        the next request's head is half in, or a body still arriving for a
        request the app answered early: those are cut off. Here the request
        partly received is answered first (with `Connection: close`); the
        header and body timeouts bound how long that takes.
        """
        self._shutting_down = True
        if self._refusal is not None:
            return  # its lingering close ends it
        responding = self.cycle is not None and not self.cycle.response_complete
        if self._phase is _Phase.IDLE and not responding:
            self.transport.close()
        elif self._phase is not _Phase.HEAD and responding:
            self.cycle.keep_alive = False
        # a head begun: its request gets keep_alive False when the head completes; a body
        # still arriving for an answered request: the connection closes when it ends

    def handle_websocket_upgrade(self) -> None:
        # httptools reports an upgrade after a refused head too; its scope is incomplete
        if self._refusal is None:
            self._stop_timers()
            super().handle_websocket_upgrade()

    # ------------------------------------------------------------ bytes in

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        if self._phase is _Phase.IDLE and self._head_began is None:
            self._head_began = self.clock.now()  # a byte between requests: a head begins
        counted = self._counted_bytes
        if counted is None or counted + len(data) <= self.limits.head.max_bytes:
            # the loop's first and only turn, without its slicing (most reads are one request)
            if counted is not None:
                self._counted_bytes = counted + len(data)
            self._feed(data)
            return
        unread = memoryview(data)
        while unread:
            if self._counted_bytes is None:
                piece, unread = unread, unread[:0]
            else:
                room = self.limits.head.max_bytes - self._counted_bytes
                if room <= 0:
                    fields = "request line and header fields"
                    if self._body_cycle is not None:
                        fields = "trailer fields"
                    limit = self.limits.head.max_bytes
                    self._refuse(Refusal(_TOO_LARGE, f"the {fields} exceed {limit} bytes"))
                    return
                piece, unread = unread[:room], unread[room:]
                self._counted_bytes += len(piece)
            if not self._feed(piece, last=not unread):
                return

    def _feed(self, piece: bytes | memoryview, *, last: bool = True) -> bool:
        """`piece` to uvicorn's parser; whether the connection reads on. After the `last`
        piece of a read, the timers for a head or body that outlives it."""
        super().data_received(piece)  # type: ignore[arg-type]
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            self._stop_timers()  # a 400 closed it, or uvicorn handed it to its WebSocket protocol
            return False
        if self._refusal is not None:
            self._refuse(self._refusal)
            return False
        if last:
            self._arm_timers()
        return True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEAD
        if self._head_began is None:
            self._head_began = self.clock.now()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is not None:
            return
        if len(self.headers) >= self.limits.head.max_fields:
            reason = f"the request has more than {self.limits.head.max_fields} header fields"
            self._refusal = Refusal(_TOO_LARGE, reason)
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._cancel_head_deadline()
        if not self._admitted:
            self._admitted = len(self.connections) <= self.limits.max_connections
            if not self._admitted:
                reason = (
                    f"the server has {len(self.connections)} open connections, over its limit "
                    f"of {self.limits.max_connections}; retry in {RETRY_AFTER_SECONDS} s"
                )
                retry_after = (b"retry-after", b"%d" % RETRY_AFTER_SECONDS)
                self._refusal = Refusal(_UNAVAILABLE, reason, (retry_after,))
                return
        self._counted_bytes = None
        self._phase = _Phase.BODY
        self._body_began = self.clock.now()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is previous:
            return  # a WebSocket upgrade makes no request: the app never sees it
        cycle = self._body_cycle = self.cycle
        if self.scope["method"] != "HEAD":  # uvicorn writes no body for HEAD: nothing to join
            cycle.transport = OneSendResponses(self.transport)  # type: ignore[assignment]
            extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
            extensions[RESPOND_EXTENSION] = extension(cycle, self.transport)
        if self._shutting_down or self._draining():
            self.cycle.keep_alive = False

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
        self._phase = _Phase.IDLE
        self._body_began = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        if self._shutting_down and self.cycle is not None and self.cycle.response_complete:
            self.transport.close()

    def on_response_complete(self) -> None:
        # uvicorn's, but for the keep-alive timer (module docstring): only the moment the
        # connection went idle is noted per response
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # its bytes came, so `_idle_since` is None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self._keep_alive_timer is None:
            self._keep_alive_timer = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_deadline
            )

    def _unset_keepalive_if_required(self) -> None:
        # bytes came, or a response completed: not idle. uvicorn's version cancels its own
        # timer, which only its `on_response_complete` arms, replaced above.
        self._idle_since = None

    def _keep_alive_deadline(self) -> None:
        self._keep_alive_timer = None
        if self._idle_since is None:
            return  # busy now: the next response arms it again
        remaining = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:  # requests came meanwhile: the idle time counts from the last one
            self._keep_alive_timer = self.loop.call_later(remaining, self._keep_alive_deadline)
            return
        self.timeout_keep_alive_handler()

    def _draining(self) -> bool:
        state: DrainState | None = self.app_state.get(DRAIN_STATE_KEY)
        return state is not None and state.draining

    # ------------------------------------------------------------ deadlines

    def _arm_timers(self) -> None:
        """Time a head or body that outlives the read it began in."""
        if self._head_began is not None and self._head_timer is None:
            remaining = self._head_began + self.limits.header_timeout_seconds - self.clock.now()
            self._head_timer = self.loop.call_later(remaining, self._head_deadline)
        if self._body_began is not None and self._body_timer is None:
            remaining = self._body_began + self.limits.body_timeout_seconds - self.clock.now()
            self._body_timer = self.loop.call_later(remaining, self._body_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self._head_began is None or self._refusal is not None:
            return
        remaining = self._head_began + self.limits.header_timeout_seconds - self.clock.now()
        if remaining > 0:  # reading was paused meanwhile: that time was not the client's
            self._head_timer = self.loop.call_later(remaining, self._head_deadline)
            return
        seconds = self.limits.header_timeout_seconds
        reason = f"the request line and header fields did not arrive within {seconds:g} s"
        self._refuse(Refusal(_TIMEOUT, reason))

    def _body_deadline(self) -> None:
        self._body_timer = None
        if self._body_began is None or self._refusal is not None:
            return
        remaining = self._body_began + self.limits.body_timeout_seconds - self.clock.now()
        if remaining > 0:  # reading was paused meanwhile: that time was not the client's
            self._body_timer = self.loop.call_later(remaining, self._body_deadline)
            return
        seconds = self.limits.body_timeout_seconds
        reason = f"the request body did not arrive within {seconds:g} s of its head"
        self._refuse(Refusal(_TIMEOUT, reason))

    def _cancel_head_deadline(self) -> None:
        self._head_began = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_timers(self) -> None:
        self._cancel_head_deadline()
        self._body_began = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # ------------------------------------------------------------ refusing

    def _refuse(self, refusal: Refusal) -> None:
        """Refuse the request being parsed: answer it if it is the next response due, then close.

        A head refused behind a response still in flight: that response ends
        the connection. A request refused in its trailers or body is the app's
        already: the app sees a disconnect, and the refusal goes out only if
        the app has written nothing. One still queued behind an earlier
        response never reaches the app: it is answered in its turn.
        """
        self._refusal = refusal
        self._stop_timers()
        self._unset_keepalive_if_required()
        self.refusal_log.warn(self.logger, refusal)
        cycle = self._body_cycle
        if cycle is None:
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
                return
        elif self.pipeline:  # the newest request is the queue's first
            self.pipeline[0] = (cycle, functools.partial(answer_refusal, refusal))
            return
        else:
            if not cycle.response_complete:
                cycle.disconnected = True  # its reads end, its writes go nowhere
            cycle.message_event.set()
        if cycle is None or not cycle.response_started:
            headers, body = refusal.response()
            status = refusal.status
            lines = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")]
            lines += [
                name + b": " + value + b"\r\n"
                for name, value in [*self.server_state.default_headers, *headers]
            ]
            self.transport.write(b"".join(lines) + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


async def answer_refusal(refusal: Refusal, scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app answering `refusal`: a refused request's turn in uvicorn's pipeline."""
    headers, body = refusal.response()
    await send({"type": "http.response.start", "status": refusal.status.value, "headers": headers})
    await send({"type": "http.response.body", "body": body})
