"""The one place an error becomes an HTTP response: the exception handler and its middleware.

Our errors (`bnfold.service.errors`) carry their status; FastAPI's and
Starlette's own (validation of path parameters, unknown routes, wrong methods)
are translated into that hierarchy first, so every error response has the
same V2 shape `{"error": "...", "request_id": "..."}` (the id `request_log` gave the
request). Anything else is a bug: a logged 500, answered by `LastResort` inside the
request's log context (Starlette's own handler for it sits outside every middleware, where
the log line would lose the request id and uvicorn would log the traceback a second time).
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bnfold.service.errors import (
    BadRequest,
    BnfoldServiceError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
    as_service_error,
)
from bnfold.service.request_log import current_request_id

logger = logging.getLogger("bnfold.service")

_BY_STATUS: dict[int, type[BnfoldServiceError]] = {
    error_type.status_code: error_type
    for error_type in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        UnsupportedMediaType,
        Unprocessable,
        Unavailable,
    )
}


def error_response(error: BnfoldServiceError) -> Response:
    body = {"error": error.message}
    request_id = current_request_id()
    if request_id is not None:
        body["request_id"] = request_id
    return Response(
        content=orjson.dumps(body),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for detail in error.errors():
        location = ".".join(str(item) for item in detail.get("loc", ()))
        parts.append(f"{location}: {detail.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def as_http_error(exc: Exception) -> BnfoldServiceError:
    """The framework's exceptions translated into ours; ours as they are; anything else a 500."""
    if isinstance(exc, RequestValidationError):
        return BadRequest(_describe_validation(exc))
    if isinstance(exc, StarletteHTTPException):
        error_type = _BY_STATUS.get(exc.status_code, BnfoldServiceError)
        return error_type(str(exc.detail), headers=exc.headers)
    return as_service_error(exc)


async def handle_error(request: Request, exc: Exception) -> Response:
    """The exception handler: every error response of the service comes from here."""
    error = as_http_error(exc)
    if error is not exc and error.status_code >= 500:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(error)


class LastResort:
    """Answer a request the handlers could not: a bug's 500, and a 503 for a request the
    shutdown grace period cuts off, instead of uvicorn's 500.

    A bug (an exception no handler took) gets `handle_error`'s logged 500 here, inside
    the request's log context. When the grace period ends, uvicorn cancels the requests still running. A
    cancellation is no bug of the request's: it gets 503 with `Retry-After` (another
    replica, or this one restarted, can take it) and `Connection: close`, and the
    cancelled task ends there. A response already started cannot be replaced; its
    cancellation goes on to uvicorn.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            await (await handle_error(Request(scope), exc))(scope, receive, send)
        except asyncio.CancelledError:
            if started:
                raise
            await cut_off_response()(scope, receive, send)


def cut_off_response() -> Response:
    """503 for a request the shutdown grace period cancelled before its answer began:
    another replica, or this one restarted, can take it."""
    return error_response(
        Unavailable(
            "the server is shutting down and its grace period ended before this "
            "request finished; retry it",
            headers={"Retry-After": "1", "Connection": "close"},
        )
    )


def install(app: FastAPI) -> None:
    """Register `handle_error` for our errors, the framework's, and everything else."""
    for exc_type in (BnfoldServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(LastResort)
