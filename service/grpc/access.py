"""The request id and the access log line of every gRPC call: the twin of `rest/access.py`.

`logs_calls` wraps each RPC of GRPCInferenceService on the servicer class once,
at import (no per-call interceptor). A call's id is its `x-request-id`
metadata, else the request's own `id` (ModelInfer), else a new one
(`request_log`); it is returned as trailing metadata `x-request-id`, and the
log lines emitted while the call runs carry it. One access line per call (a
stream is one call: its bytes are the sum of its messages), with the model and
version of the request (`note_model` names the version that answered), the
status code's name, and the peer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

from bnfold.service.access_log import AccessEntry, AccessLog
from bnfold.service.request_log import (
    CURRENT_REQUEST,
    REQUEST_ID_HEADER,
    RequestContext,
    checked_request_id,
    request_context,
)

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
METHOD = "GRPC"

Context = grpc.aio.ServicerContext


class LoggedServicer(Protocol):
    access_log: AccessLog | None


ServicerClass = TypeVar("ServicerClass", bound=type)


def call_context(context: Context, request: Any) -> RequestContext:
    """The call's request context: its id from the metadata, else from the request's `id`;
    model and version from the request's fields, where the message has them."""
    client_id = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            client_id = value
            break
    call = request_context(client_id)
    if not call.from_client:
        body_id = checked_request_id(getattr(request, "id", None) or None)
        if body_id is not None:
            call.request_id = body_id
    model = getattr(request, "model_name", None) or getattr(request, "name", None)
    version = getattr(request, "model_version", None) or getattr(request, "version", None)
    call.model, call.version = model or None, version or None
    return call


def _code_name(context: Context) -> str:
    code = context.code()
    return "UNKNOWN" if not isinstance(code, grpc.StatusCode) else code.name


def _entry(
    call: RequestContext,
    path: str,
    status: str,
    sizes: tuple[int, int],
    started: int,
    context: Context,
) -> AccessEntry:
    return AccessEntry(
        time.time(),
        METHOD,
        path,
        call.model,
        call.version,
        status,
        sizes[0],
        sizes[1],
        time.perf_counter_ns() - started,
        call.request_id,
        context.peer(),
    )


def _unary(rpc: Callable[..., Any], path: str) -> Callable[..., Any]:
    @functools.wraps(rpc)
    async def logged(self: LoggedServicer, request: Message, context: Context) -> Any:
        started = time.perf_counter_ns()
        call = call_context(context, request)
        token = CURRENT_REQUEST.set(call)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
        status = "OK"
        response = None
        try:
            response = await rpc(self, request, context)
            return response
        except BaseException as exc:
            status = _failure_status(exc, context)
            raise
        finally:
            CURRENT_REQUEST.reset(token)
            access_log = self.access_log
            if access_log is not None and access_log.writes_lines:
                sizes = (request.ByteSize(), 0 if response is None else response.ByteSize())
                access_log.record(_entry(call, path, status, sizes, started, context))

    return logged


def _failure_status(exc: BaseException, context: Context) -> str:
    """The status an RPC that raised `exc` ends with, for its access line."""
    if isinstance(exc, grpc.aio.AbortError):
        return _code_name(context)
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


def _stream(rpc: Callable[..., Any], path: str) -> Callable[..., Any]:
    @functools.wraps(rpc)
    async def logged(
        self: LoggedServicer, requests: AsyncIterator[Message], context: Context
    ) -> AsyncIterator[Message]:
        started = time.perf_counter_ns()
        call = call_context(context, None)
        CURRENT_REQUEST.set(call)  # the call's own task: nothing else runs in its context
        context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
        status = "OK"
        bytes_in = bytes_out = 0

        async def counted() -> AsyncIterator[Message]:
            nonlocal bytes_in
            async for request in requests:
                bytes_in += request.ByteSize()
                yield request

        try:
            async for response in rpc(self, counted(), context):
                bytes_out += response.ByteSize()
                yield response
        except BaseException as exc:
            status = _failure_status(exc, context)
            raise
        finally:
            access_log = self.access_log
            if access_log is not None and access_log.writes_lines:
                sizes = (bytes_in, bytes_out)
                access_log.record(_entry(call, path, status, sizes, started, context))

    return logged


def logs_calls(servicer_class: ServicerClass) -> ServicerClass:
    """`servicer_class` with each GRPCInferenceService method wrapped: request id, log
    context, access line. The servicer's `access_log` (None: no access lines)."""
    for method in SERVICE.methods:
        rpc = getattr(servicer_class, method.name)
        path = f"/{SERVICE.full_name}/{method.name}"
        streaming = method.client_streaming or method.server_streaming
        setattr(servicer_class, method.name, (_stream if streaming else _unary)(rpc, path))
    return servicer_class
