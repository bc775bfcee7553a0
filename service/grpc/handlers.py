"""The servicer's methods as grpc handlers: what the generated `add_..._to_server` registers,
with one difference, that a request which does not parse is the client's mistake.

grpcio answers a request its deserializer cannot parse with UNKNOWN ("Unexpected
DecodeError"), before any code of ours runs; a client mistake must never come back
as UNKNOWN or INTERNAL. So each method's deserializer here returns an `Unreadable`
instead of raising, and the method, wrapped once at registration (no per-call
interceptor), ends such a call with INVALID_ARGUMENT naming the message type. In a
stream, an unreadable message ends the stream the same way.

The handlers are built from the protocol's service descriptor (tritonclient's
generated `service_pb2`), so every method of GRPCInferenceService is registered,
with its request and response types, exactly as the generated code does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2

from bnfold.service.grpc.servicer import InferenceServicer

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]

Context = grpc.aio.ServicerContext


@dataclass(frozen=True)
class Unreadable:
    """A request that did not parse as its method's message, and why."""

    reason: str


def _reader(message_type: Descriptor) -> Callable[[bytes], Message | Unreadable]:
    parse = message_factory.GetMessageClass(message_type).FromString

    def read(data: bytes) -> Message | Unreadable:
        try:
            return parse(data)
        except DecodeError as exc:
            return Unreadable(f"the request is not a valid {message_type.full_name}: {exc}")

    return read


def _unary(behaviour: Callable[[Any, Context], Any]) -> Callable[[Any, Context], Any]:
    async def rpc(request: Message | Unreadable, context: Context) -> Any:
        if isinstance(request, Unreadable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behaviour(request, context)

    return rpc


def _stream(behaviour: Callable[[Any, Context], Any]) -> Callable[[Any, Context], Any]:
    async def rpc(requests: AsyncIterator[Message | Unreadable], context: Context) -> Any:
        async def readable() -> AsyncIterator[Message]:
            async for request in requests:
                if isinstance(request, Unreadable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                yield request

        async for response in behaviour(readable(), context):
            yield response

    return rpc


def method_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of GRPCInferenceService, by name, bound to `servicer`."""
    handlers = {}
    for method in SERVICE.methods:
        behaviour = getattr(servicer, method.name)
        read = _reader(method.input_type)
        write = message_factory.GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming or method.server_streaming:  # ModelStreamInfer
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream(behaviour), request_deserializer=read, response_serializer=write
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour), request_deserializer=read, response_serializer=write
            )
    return handlers


def register(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """What the generated `add_GRPCInferenceServiceServicer_to_server` does, with these
    handlers: the generic handler, and the same handlers as registered methods (grpcio
    finds those without matching the method name as a string)."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
