"""Request ids, and the log lines that carry them: text or one JSON object per line.

Every request (REST or gRPC) gets an id: the client's `X-Request-ID` (gRPC
metadata `x-request-id`), else the V2 request's own `id`, else a new one. The
transports echo it (response header, gRPC trailing metadata, the error body)
and every log record emitted while the request is handled carries it: the id
lives in a context variable, one value per asyncio task (uvicorn and grpc.aio
run each request in a task of its own), and `RequestIdFilter` copies it onto
each record the handler writes. An incoming id that is not 1 to 128 visible
ASCII characters is replaced by a new one and never echoed: it would otherwise
forge log lines or response headers.

The log format is chosen once per process (`configure_logging`, each
`--workers` process on its own); uvicorn's loggers propagate to the same handler.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

from bnfold.service.access_log import AccessEntry, LineFormat, access_fields, access_message
from bnfold.service.settings import LogFormat, LogLevel

REQUEST_ID_HEADER = "x-request-id"  # the HTTP header, and the gRPC metadata key
MAX_REQUEST_ID_LENGTH = 128
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(request_tag)s: %(message)s"


@dataclass(slots=True)
class RequestContext:
    """What the log lines about one request share: its id, and the model and version it
    went to once known. `from_client`: the id came with the request's headers (a V2 body's
    `id` does not replace it)."""

    request_id: str
    from_client: bool = False
    model: str | None = None
    version: str | None = None


CURRENT_REQUEST: ContextVar[RequestContext | None] = ContextVar("bnfold_request", default=None)


#: Seeded from the OS's random source in each process (a fork re-seeds: `_reseed`).
_ids = random.Random()


def _reseed() -> None:
    _ids.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """16 hex digits, unique across requests and worker processes without any shared
    counter. Not a secret (clients see them; they name requests in logs), so a seeded
    generator will do: 0.15 µs against 0.3 µs for a getrandom system call each time."""
    return f"{_ids.getrandbits(64):016x}"


def checked_request_id(value: str | bytes | None) -> str | None:
    """`value` if it is a usable id (1 to 128 visible ASCII characters), else None."""
    if value is None or not 0 < len(value) <= MAX_REQUEST_ID_LENGTH or not value.isascii():
        return None
    text = value.decode("ascii") if isinstance(value, bytes) else value
    return text if text.isprintable() and " " not in text else None


def request_context(client_id: str | bytes | None) -> RequestContext:
    """The context of a request that came with `client_id` (None: without one)."""
    checked = checked_request_id(client_id)
    if checked is None:
        return RequestContext(new_request_id())
    return RequestContext(checked, from_client=True)


def current_request_id() -> str | None:
    context = CURRENT_REQUEST.get()
    return None if context is None else context.request_id


def adopt_body_id(body_id: str | None) -> None:
    """The V2 request's `id`, once its body is decoded, as the request id, unless the
    client sent the id as a header already (or `body_id` is not a usable id)."""
    context = CURRENT_REQUEST.get()
    if context is None or context.from_client:
        return
    checked = checked_request_id(body_id)
    if checked is not None:
        context.request_id = checked


def note_model(name: str, version: int | str) -> None:
    """The model version that answered the current request, for its access log line."""
    context = CURRENT_REQUEST.get()
    if context is not None:
        context.model = name
        context.version = str(version)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record as `request_id` (None outside a
    request), unless the record carries one already (the access log's lines do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class TextFormatter(logging.Formatter):
    """`time level logger [req=<id>]: message`, the tag only for a record about a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [req={request_id}]" if request_id else ""
        return super().format(record)

    def format_access(self, entry: AccessEntry, level: int, logger_name: str) -> str:
        """The line `format` makes of `access_record(entry, logger_name)` (`access_log`)."""
        second = int(entry.time)
        cached_second, stamp = self._second
        if second != cached_second:  # `formatTime`'s default, once a second
            stamp = time.strftime(self.default_time_format, self.converter(entry.time))
            self._second = (second, stamp)
        msecs = int((entry.time - second) * 1000)
        tag = f" [req={entry.request_id}]" if entry.request_id else ""
        return (
            f"{stamp},{msecs:03d} {logging.getLevelName(level):<7} {logger_name}{tag}: "
            f"{access_message(entry)}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, RFC 3339), level, logger, message, the
    request id when there is one, an access line's fields, and the traceback of an error."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            fields["request_id"] = request_id
        access = getattr(record, "access", None)
        if access:
            fields.update(access)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(fields, option=orjson.OPT_UTC_Z).decode()

    def format_access(self, entry: AccessEntry, level: int, logger_name: str) -> str:
        """The line `format` makes of `access_record(entry, logger_name)` (`access_log`)."""
        fields: dict[str, Any] = {
            "time": datetime.fromtimestamp(entry.time, timezone.utc),
            "level": logging.getLevelName(level),
            "logger": logger_name,
            "message": access_message(entry),
        }
        if entry.request_id:
            fields["request_id"] = entry.request_id
        fields.update(access_fields(entry))
        return orjson.dumps(fields, option=orjson.OPT_UTC_Z).decode()


def direct_access_lines(handler: logging.Handler) -> LineFormat | None:
    """The function that writes `handler`'s access lines straight from their entries
    (`access_log.write_batch`, given to the app's `AccessLog`), when the handler is exactly as `log_handler` makes it: our
    formatter with its own time format, and no filter but `RequestIdFilter`, which leaves
    an access record as it is. None for anything else, a subclass included (its `format`,
    `formatTime` or `filter` would be skipped): those handlers get log records."""
    formatter = handler.formatter
    if any(type(found) is not RequestIdFilter for found in handler.filters):
        return None
    if type(formatter) is JsonFormatter:
        return formatter.format_access
    if (
        type(formatter) is TextFormatter
        and formatter.datefmt is None
        and formatter.default_time_format == logging.Formatter.default_time_format
        and formatter.default_msec_format == "%s,%03d"
    ):
        return formatter.format_access
    return None


def log_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `log_format` lines, with request ids, to `stream` (stderr)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else TextFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(
    level: LogLevel, log_format: LogFormat = LogFormat.TEXT, stream: TextIO | None = None
) -> None:
    """The process's logging: one handler on the root logger, which uvicorn's loggers
    (`uvicorn.error`; its access log is off, `access_log` writes ours) propagate to."""
    logging.basicConfig(
        level=level.value.upper(), handlers=[log_handler(log_format, stream)], force=True
    )
