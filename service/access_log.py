"""The access log: one line per request, REST and gRPC, written off the event loop.

The event loop only builds an `AccessEntry` tuple and appends it to a bounded
deque (`record`, about 0.1 µs); a thread, woken by the first entry to an empty
queue, gathers entries for `interval` seconds and writes them as lines of the
`bnfold.access` logger: the app's own
handler (`request_log`) formats each straight from its entry, any other
handler gets a log record. A full deque drops the entry and counts it
(`dropped`, and a warning from the thread), so a slow log sink never blocks the
loop and never grows memory. When the level writes no access line at all
(`writes_lines`), no entry is made.

Probes (REST health and /metrics, gRPC ServerLive and ServerReady) that
succeed are logged at DEBUG: Kubernetes probes every few seconds and Prometheus
scrapes would outnumber the real requests of a quiet replica, and their
success is visible elsewhere (kubelet events, Prometheus `up`). A failed
probe (a 503 readiness while draining) is a line at INFO like any other.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

DEFAULT_CAPACITY = 10_000
DEFAULT_INTERVAL_SECONDS = 0.05
ACCESS_LOGGER = "bnfold.access"
PROBE_PATHS = frozenset(
    {
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
_MESSAGE = '%s "%s %s" %s model=%s version=%s in=%d out=%d %.2f ms'

logger = logging.getLogger("bnfold.service")


class AccessEntry(NamedTuple):
    """One request as the transport saw it. `status`: the HTTP status (int) or the gRPC
    status code's name; `client`: (host, port) or gRPC's peer string, None if unknown."""

    time: float
    method: str
    path: str
    model: str | None
    version: str | None
    status: int | str
    bytes_in: int
    bytes_out: int
    latency_ns: int
    request_id: str | None
    client: tuple[str, int] | str | None


def client_text(client: tuple[str, int] | str | None) -> str:
    if client is None:
        return "-"
    if isinstance(client, str):  # gRPC's peer: "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
        return client.partition(":")[2] or client
    host, port = client
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_level(entry: AccessEntry) -> int:
    """DEBUG for a probe that succeeded (module docstring), else INFO."""
    quiet = entry.path in PROBE_PATHS and entry.status in (200, "OK")
    return logging.DEBUG if quiet else logging.INFO


def access_arguments(entry: AccessEntry) -> tuple[object, ...]:
    """The values the line's text (`_MESSAGE`) is made of: client, request, status, model,
    version, bytes, latency."""
    return (
        client_text(entry.client),
        entry.method,
        entry.path,
        entry.status,
        entry.model or "-",
        entry.version or "-",
        entry.bytes_in,
        entry.bytes_out,
        entry.latency_ns / 1e6,
    )


def access_message(entry: AccessEntry) -> str:
    """The line's text, as a record's `getMessage()` makes it."""
    return _MESSAGE % access_arguments(entry)


def access_fields(entry: AccessEntry) -> dict[str, object]:
    """The entry's fields as the JSON format writes them."""
    return {
        "method": entry.method,
        "path": entry.path,
        "model": entry.model,
        "version": entry.version,
        # one type per JSON key, for the log shippers' index mappings
        "status" if isinstance(entry.status, int) else "grpc_status": entry.status,
        "bytes_in": entry.bytes_in,
        "bytes_out": entry.bytes_out,
        "latency_ms": round(entry.latency_ns / 1e6, 3),
        "client": client_text(entry.client),
    }


def access_record(entry: AccessEntry, logger_name: str = ACCESS_LOGGER) -> logging.LogRecord:
    """The log record of `entry`: a text message, and its fields for the JSON format.
    What any handler gets; the app's own formatters write the same line straight from
    the entry (`format_access`, `write_batch`)."""
    record = logging.LogRecord(
        logger_name, access_level(entry), __file__, 0, _MESSAGE, access_arguments(entry), None
    )
    record.created = entry.time
    record.msecs = (entry.time - int(entry.time)) * 1000
    record.request_id = entry.request_id
    record.access = access_fields(entry)
    return record


#: A line straight from an entry: (entry, level, logger name) -> the line.
LineFormat = Callable[[AccessEntry, int, str], str]
#: The `LineFormat` for a handler whose lines may skip the log record, else None.
DirectLines = Callable[[logging.Handler], LineFormat | None]


class AccessLog:
    """The bounded queue of access entries and the thread that writes them.

    `record` is the only method for the event loop; `start` and `stop` (which writes
    what is queued, then ends the thread) belong to the app's lifespan. `direct_lines`
    (the app passes `request_log.direct_access_lines`, which this module may not
    import: it imports this one) picks the handlers whose lines skip the log record.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        logger_name: str = ACCESS_LOGGER,
        direct_lines: DirectLines | None = None,
    ) -> None:
        self.capacity = capacity
        self.interval = interval
        self.direct_lines = direct_lines
        self.logger = logging.getLogger(logger_name)
        self.dropped = 0
        self._entries: deque[AccessEntry] = deque()
        self._arrived = threading.Event()  # an entry came to an empty queue, or stop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def writes_lines(self) -> bool:
        """Whether a line would be written at all: not when the level is above INFO (as
        `--log-level warning` sets it; a probe's DEBUG line is below INFO). Callers skip
        building the entry then, and the writer thread has nothing to take the GIL for."""
        return self.logger.isEnabledFor(logging.INFO)

    def record(self, entry: AccessEntry) -> None:
        """Queue `entry`, or count it as dropped when the queue is full: never blocks.

        The first entry after the writer emptied the queue wakes it (once a batch, after
        the append, so no entry can wait for a wake that came before it)."""
        entries = self._entries
        if len(entries) < self.capacity:
            was_empty = not entries
            entries.append(entry)
            if was_empty:
                self._arrived.set()
        else:
            self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bnfold-access-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued and end the thread (blocking: call it off the loop)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._arrived.set()
        thread.join(timeout)

    def _run(self) -> None:
        """Sleep until an entry comes, gather entries for `interval`, write them.

        Not a timer every `interval`: a thread that merely wakes up every 50 ms made one
        inline run in ten on the event loop 10 µs slower (BENCHMARKS.md, the tiny-model
        gap), and at `--log-level warning` or on an idle server there is nothing to write.
        """
        reported = 0
        while True:
            self._arrived.wait()
            self._arrived.clear()
            stopping = self._stop.wait(self.interval)
            self.write_pending()
            dropped = self.dropped
            if dropped != reported:
                logger.warning(
                    "access log: %d line(s) dropped, the queue of %d was full (%d in all)",
                    dropped - reported,
                    self.capacity,
                    dropped,
                )
                reported = dropped
            if stopping:
                return

    def write_pending(self) -> None:
        """Format and write every queued entry (on the writer thread)."""
        queued, access_logger = self._entries, self.logger
        entries = []
        while queued:
            entry = queued.popleft()
            level = access_level(entry)
            if access_logger.isEnabledFor(level):
                entries.append((entry, level))
        if not entries:
            return
        handlers = plain_stream_handlers(access_logger)
        if handlers is None:
            for entry, _ in entries:
                access_logger.handle(access_record(entry, access_logger.name))
            return
        for handler in handlers:
            direct = None if self.direct_lines is None else self.direct_lines(handler)
            write_batch(handler, entries, access_logger.name, direct)


def plain_stream_handlers(logger: logging.Logger) -> list[logging.StreamHandler] | None:
    """The handlers `logger.handle` would pass a record to, when every one of them is a
    plain `StreamHandler` (one whose `emit` is the stock one) and no logger on the way
    has filters; else None, and records go through `handle` one by one."""
    handlers: list[logging.StreamHandler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if not isinstance(handler, logging.StreamHandler):
                return None
            if type(handler).emit is not logging.StreamHandler.emit:
                return None
            handlers.append(handler)
        current = current.parent if current.propagate else None
    return handlers or None  # none at all: `handle` falls back to logging.lastResort


def write_batch(
    handler: logging.StreamHandler,
    entries: list[tuple[AccessEntry, int]],
    logger_name: str,
    direct: LineFormat | None = None,
) -> None:
    """`handler.handle` for each (entry, level), with one write and one flush for the lot.

    The writer thread formats with the GIL held, as the event loop runs Python; a
    write and a flush per line (a system call each) made every request's line cost
    the loop about as much again as its formatting (measured: BENCHMARKS.md, the
    tiny-model gap). Lines, levels and filters are as `handle` would make them.

    Given `direct` (for a handler exactly as the app makes it:
    `request_log.direct_access_lines`), each line comes straight from its entry: making
    a `LogRecord` and formatting it cost the writer about 6 µs a line with the GIL
    held, which the event loop waited for.
    """
    lines = []
    for entry, level in entries:
        if level < handler.level:
            continue
        try:
            if direct is not None:
                line = direct(entry, level, logger_name)
            else:
                record = access_record(entry, logger_name)
                if not handler.filter(record):
                    continue
                line = handler.format(record)
        except Exception:
            handler.handleError(access_record(entry, logger_name))
            continue
        lines.append(line + handler.terminator)
    if not lines:
        return
    with handler.lock:  # type: ignore[union-attr]
        try:
            handler.stream.write("".join(lines))
            handler.flush()
        except Exception:
            handler.handleError(access_record(entries[-1][0], logger_name))
