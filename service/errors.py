"""The service's errors: one hierarchy, each class carrying its HTTP status.

Code raises the most specific error where it finds the problem; `install`
registers the one handler that turns any of them into the V2 error body
`{"error": "..."}`. FastAPI's and Starlette's own errors (validation of path
parameters, unknown routes, wrong methods) are translated into this hierarchy
first, so every error response has the same shape. Only a bug is a 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("bnfold.service")


class BnfoldServiceError(Exception):
    """Base of every error the service reports to a client."""

    status_code: ClassVar[int] = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequest(BnfoldServiceError):
    """Malformed JSON, tensor or parameter: the request cannot be read."""

    status_code = 400


class Unauthorized(BnfoldServiceError):
    """Missing or wrong admin bearer token."""

    status_code = 401

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", **(headers or {})})


class Forbidden(BnfoldServiceError):
    """The endpoint is switched off (admin endpoints without BNFOLD_ADMIN_TOKEN)."""

    status_code = 403


class NotFound(BnfoldServiceError):
    """Unknown model, version or route."""

    status_code = 404


class MethodNotAllowed(BnfoldServiceError):
    status_code = 405


class PayloadTooLarge(BnfoldServiceError):
    """Request body (or its decompressed form) over `max_body_bytes`, or a body whose
    estimated decoding cost alone exceeds the decode budget (`max_decode_bytes`)."""

    status_code = 413


class UnsupportedMediaType(BnfoldServiceError):
    """A Content-Encoding the service cannot decode."""

    status_code = 415


class Unprocessable(BnfoldServiceError):
    """Well-formed, but does not fit the model: names, shapes, datatypes, batch statistics."""

    status_code = 422


class Unavailable(BnfoldServiceError):
    """Known but not ready: a broken or unloaded package, a server shutting down."""

    status_code = 503


class QueueFull(Unavailable):
    """A model's request queue is at `max_queue_size`: refused at once, the client retries later."""

    RETRY_AFTER_SECONDS: ClassVar[int] = 1

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        retry = {"Retry-After": str(self.RETRY_AFTER_SECONDS)}
        super().__init__(message, headers={**retry, **(headers or {})})


class DecodeBudgetFull(QueueFull):
    """The requests in flight hold the decode budget (`max_decode_bytes`): refused at once,
    the client retries later."""


class PackageError(Unavailable):
    """A package that cannot be served; the message is the reason shown in the index."""


class DeviceUnavailable(Unavailable):
    """`--device cuda` without onnxruntime-gpu or a usable GPU (a start-up error)."""


def error_response(error: BnfoldServiceError) -> Response:
    """The one place an error becomes an HTTP response."""
    return Response(
        content=orjson.dumps({"error": error.message}),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


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


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for detail in error.errors():
        location = ".".join(str(item) for item in detail.get("loc", ()))
        parts.append(f"{location}: {detail.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def as_service_error(exc: Exception) -> BnfoldServiceError:
    """Translate the framework's exceptions into ours; anything else is a bug (500)."""
    if isinstance(exc, BnfoldServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        return BadRequest(_describe_validation(exc))
    if isinstance(exc, StarletteHTTPException):
        error_type = _BY_STATUS.get(exc.status_code, BnfoldServiceError)
        return error_type(str(exc.detail), headers=exc.headers)
    return BnfoldServiceError("internal server error")


async def handle_error(request: Request, exc: Exception) -> Response:
    """The exception handler: every error response of the service comes from here."""
    error = as_service_error(exc)
    if error is not exc and error.status_code >= 500:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(error)


class CutOffAtShutdown:
    """Answer 503 to a request the shutdown grace period cuts off, instead of uvicorn's 500.

    When the grace period ends, uvicorn cancels the requests still running. A
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
        except asyncio.CancelledError:
            if started:
                raise
            cut_off = Unavailable(
                "the server is shutting down and its grace period ended before this "
                "request finished; retry it",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await error_response(cut_off)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register `handle_error` for our errors, the framework's, and everything else."""
    for exc_type in (BnfoldServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(CutOffAtShutdown)
