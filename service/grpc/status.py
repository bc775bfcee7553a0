"""The one place a service error becomes a gRPC status: the code its class carries, its message.

`errors.py` gives every error class a `grpc_code` beside its HTTP status, so a
client mistake is INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED... exactly as
REST answers 4xx; only a bug is INTERNAL, logged with its traceback and
reported without it. An error telling the client to come back later (a full
queue or decode budget: `Retry-After` over REST) carries the same advice as
trailing metadata: `grpc-retry-pushback-ms`, which gRPC's own retry policy
honours, and `retry-after` in seconds, as the HTTP header.

Cancellation (the client went away, or the shutdown grace period ended) is no
error of ours: it passes through untouched, and grpc ends the call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from bnfold.service.errors import BnfoldServiceError, as_service_error
from bnfold.service.request_log import REQUEST_ID_HEADER, current_request_id

logger = logging.getLogger("bnfold.service")

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after"

Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Rpc = Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def status_code(error: BnfoldServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[error.grpc_code]


def trailing_metadata(error: BnfoldServiceError) -> tuple[tuple[str, str], ...]:
    """The retry advice of an error that has some (its Retry-After header), else nothing."""
    retry_after = (error.headers or {}).get("Retry-After")
    if retry_after is None:
        return ()
    milliseconds = round(float(retry_after) * 1000)
    return ((RETRY_PUSHBACK_KEY, str(milliseconds)), (RETRY_AFTER_KEY, retry_after))


def service_error(exc: Exception, rpc: str) -> BnfoldServiceError:
    """`exc` as one of ours; anything else is a bug, logged here and reported as INTERNAL."""
    error = as_service_error(exc)
    if error is not exc:
        logger.error("internal error in gRPC %s", rpc, exc_info=exc)
    return error


def reports_errors(method: Rpc[Servicer, Request, Response]) -> Rpc[Servicer, Request, Response]:
    """An RPC whose errors end the call with their status (unary RPCs; the stream reports
    each request's error in its response instead)."""

    @functools.wraps(method)
    async def rpc(self: Servicer, request: Request, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error = service_error(exc, method.__name__)
            metadata = trailing_metadata(error)
            request_id = current_request_id()
            if metadata and request_id is not None:  # abort's metadata replaces the call's
                metadata = (*metadata, (REQUEST_ID_HEADER, request_id))
            await context.abort(status_code(error), error.message, metadata)

    return rpc
