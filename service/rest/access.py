"""The request id and the access log line of every HTTP request: one pure ASGI middleware.

Outermost of the app's own middleware, so it sees every request the router
and the error handlers answer: it sets the request's context (`request_log`)
before anything else runs, adds `X-Request-ID` to the response head, counts
the body bytes both ways and queues one `AccessEntry` when the request ends.
Pure ASGI on purpose: FastAPI's `@app.middleware("http")` (BaseHTTPMiddleware)
costs tens of microseconds a request; this costs a few (BENCHMARKS.md).

Model and version come from the route's path parameters, unless the data
plane named the version that answered (`request_log.note_model`). The
middleware also starts the access log's writer thread with the app's lifespan
and stops it (writing what is queued) when the app has shut down.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import Token

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bnfold.service.access_log import AccessEntry, AccessLog
from bnfold.service.metrics import CLIENT_CLOSED_REQUEST
from bnfold.service.request_log import (
    CURRENT_REQUEST,
    REQUEST_ID_HEADER,
    RequestContext,
    request_context,
)

REQUEST_ID_FIELD = REQUEST_ID_HEADER.encode("latin-1")

_LIFESPAN_ENDS = frozenset(
    {"lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"}
)


def header_value(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def finish_request(
    access_log: AccessLog | None,
    token: Token[RequestContext | None],
    scope: Scope,
    context: RequestContext,
    status: int,
    bytes_in: int,
    bytes_out: int,
    started_ns: int,
) -> None:
    """The end of the HTTP request `scope`, begun at `started_ns`: its context unset, its
    access entry queued (when there is an access log)."""
    CURRENT_REQUEST.reset(token)
    if access_log is None or not access_log.writes_lines:
        return
    params = scope.get("path_params") or {}
    access_log.record(
        AccessEntry(
            time.time(),
            scope["method"],
            scope["path"],
            context.model or params.get("model_name"),
            context.version or params.get("model_version"),
            status,
            bytes_in,
            bytes_out,
            time.perf_counter_ns() - started_ns,
            context.request_id,
            scope.get("client"),
        )
    )


def ended_status(error: BaseException) -> int:
    """The status an access line gives a request that ended in `error` before an answer
    began: 499 when it was cancelled (its client went away, or the shutdown grace ended)."""
    return CLIENT_CLOSED_REQUEST if isinstance(error, asyncio.CancelledError) else 500


class RequestLogMiddleware:
    """Request ids for every HTTP request; an access log line each when `access_log`."""

    def __init__(self, app: ASGIApp, access_log: AccessLog | None) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._request(scope, receive, send)
        elif scope["type"] == "lifespan" and self.access_log is not None:
            await self._lifespan(self.access_log, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter_ns()
        context = request_context(header_value(scope, REQUEST_ID_FIELD))
        token = CURRENT_REQUEST.set(context)
        status = 0
        bytes_in = bytes_out = 0

        async def counted_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        async def tagged_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                tag = (REQUEST_ID_FIELD, context.request_id.encode("ascii"))
                message["headers"] = [*message.get("headers", ()), tag]
            else:
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, tagged_send)
        except BaseException as exc:
            status = status or ended_status(exc)
            raise
        finally:
            finish_request(
                self.access_log, token, scope, context, status, bytes_in, bytes_out, started
            )

    async def _lifespan(
        self, access_log: AccessLog, scope: Scope, receive: Receive, send: Send
    ) -> None:
        async def starting_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                access_log.start()
            return message

        async def stopping_send(message: Message) -> None:
            if message["type"] in _LIFESPAN_ENDS:
                await asyncio.to_thread(access_log.stop)
            await send(message)

        await self.app(scope, starting_receive, stopping_send)
