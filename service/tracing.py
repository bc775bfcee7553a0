"""OpenTelemetry spans of infer and compare, recorded after the fact from measured phases.

A request's span and its children (decode, queue, run, encode) are not opened
and closed around the code that does the work: the queue wait and the run
happen on the batcher's worker thread, where an OpenTelemetry context would
have to be carried across threads for every request. Instead the data plane
already measures each phase for the statistics extension; when the request
ends, the transport hands those timestamps to `Tracing.record`, which emits
the whole tree at once with explicit start and end times. The hot path gains
no work when tracing is off (`Tracing` is None and the transports skip the
call) and one call per request when it is on.

The parent comes from the client's W3C `traceparent` / `tracestate` (HTTP
headers or gRPC metadata), so a client's trace continues through the server.
Health, metadata and metrics requests are never traced. Spans leave over
OTLP/HTTP (`--otlp-endpoint`) through a batch processor, off the event loop;
tests pass their own span processor (the SDK's in-memory exporter).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bnfold.service.errors import BnfoldServiceError
from bnfold.service.metrics import CLIENT_CLOSED_REQUEST

if TYPE_CHECKING:
    from bnfold.service.dataplane import Prediction

SERVICE_NAME = "bnfold"

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class Phase:
    """One measured step of a request, in `time.time_ns()` nanoseconds."""

    name: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class TracedRequest:
    """What a transport knows of a finished infer or compare request."""

    kind: str  # "infer" or "compare"
    transport: str  # "http" or "grpc"
    model: str
    version: str | None
    start_ns: int
    end_ns: int
    carrier: Mapping[str, str]  # headers or metadata holding traceparent / tracestate
    phases: Sequence[Phase] = ()
    batch_size: int | None = None
    request_id: str | None = None
    error: str | None = None
    status_code: int | None = None  # HTTP status, or the gRPC code's number


class Tracing:
    """The tracer of one app; `shutdown` flushes what the processor still holds."""

    def __init__(self, processor: SpanProcessor, server_version: str) -> None:
        resource = Resource.create(
            {"service.name": SERVICE_NAME, "service.version": server_version}
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("bnfold.service", server_version)

    @classmethod
    def otlp(cls, endpoint: str, server_version: str) -> Tracing:
        """Export over OTLP/HTTP (protobuf) to `endpoint`, batched off the event loop."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)), server_version)

    def record(self, request: TracedRequest) -> None:
        """Emit the request's span (a SERVER span, child of the client's traceparent when
        there is one) and one child per phase."""
        parent = _PROPAGATOR.extract(carrier=_lowercase(request.carrier))
        attributes: dict[str, str | int] = {
            "bnfold.request": request.kind,
            "bnfold.model.name": request.model,
        }
        if request.transport == "grpc":
            attributes["rpc.system"] = "grpc"
        else:
            attributes["network.protocol.name"] = "http"
        if request.version is not None:
            attributes["bnfold.model.version"] = request.version
        if request.batch_size is not None:
            attributes["bnfold.batch_size"] = request.batch_size
        if request.request_id is not None:
            attributes["bnfold.request_id"] = request.request_id
        if request.status_code is not None:
            grpc = request.transport == "grpc"
            attributes["rpc.grpc.status_code" if grpc else "http.response.status_code"] = (
                request.status_code
            )
        span = self._tracer.start_span(
            f"{request.kind} {request.model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=request.start_ns,
        )
        if request.error is not None:
            span.set_status(Status(StatusCode.ERROR, request.error))
        inside = trace.set_span_in_context(span)
        for phase in request.phases:
            child = self._tracer.start_span(
                phase.name, context=inside, kind=SpanKind.INTERNAL, start_time=phase.start_ns
            )
            child.end(end_time=phase.end_ns)
        span.end(end_time=request.end_ns)

    def shutdown(self) -> None:
        self._provider.shutdown()


def _lowercase(carrier: Mapping[str, str]) -> dict[str, str]:
    """The propagator looks keys up as given; HTTP headers and gRPC metadata are
    case-insensitive, so compare them in lower case."""
    return {key.lower(): value for key, value in carrier.items()}


class RequestSpan:
    """Collects one request's phases as the transport passes them (`decoded`, `predicted`,
    `ran`, `encoded`) and records its span when the `with` block ends, failed or not.

    The phases are durations measured on the monotonic clock; they are laid end to end
    from the request's wall-clock start: decode, then queue and run (from the data plane's
    `Prediction`), and encode ending where the request ends.
    """

    __slots__ = (
        "_carrier",
        "_decode_ns",
        "_encode_ns",
        "_kind",
        "_model",
        "_prediction",
        "_request_id",
        "_run_ns",
        "_start_ns",
        "_start_perf",
        "_tracing",
        "_transport",
        "_version",
    )

    def __init__(
        self,
        tracing: Tracing,
        kind: str,
        transport: str,
        model: str,
        version: str | None,
        carrier: Mapping[str, str],
    ) -> None:
        self._tracing = tracing
        self._kind = kind
        self._transport = transport
        self._model = model
        self._version = version
        self._carrier = carrier
        self._start_ns = time.time_ns()
        self._start_perf = time.perf_counter_ns()
        self._decode_ns: int | None = None
        self._encode_ns: int | None = None
        self._run_ns: int | None = None
        self._prediction: Prediction | None = None
        self._request_id: str | None = None

    def __enter__(self) -> RequestSpan:
        return self

    def identify(self, request_id: str | None) -> None:
        self._request_id = request_id

    def decoded(self, ns: int) -> None:
        self._decode_ns = ns

    def predicted(self, prediction: Prediction) -> None:
        self._prediction = prediction

    def ran(self, ns: int) -> None:
        """A run without the batcher (compare: both graphs)."""
        self._run_ns = ns

    def encoded(self, ns: int) -> None:
        self._encode_ns = ns

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        end_ns = self._start_ns + (time.perf_counter_ns() - self._start_perf)
        phases: list[Phase] = []
        cursor = self._start_ns
        if self._decode_ns is not None:
            phases.append(Phase("decode", cursor, cursor + self._decode_ns))
            cursor += self._decode_ns
        prediction = self._prediction
        if prediction is not None:
            queue_end = cursor + prediction.queue_ns
            phases.append(Phase("queue", cursor, queue_end))
            phases.append(Phase("run", queue_end, cursor + prediction.predict_ns))
        elif self._run_ns is not None:
            phases.append(Phase("run", cursor, cursor + self._run_ns))
        if self._encode_ns is not None:
            phases.append(Phase("encode", end_ns - self._encode_ns, end_ns))
        self._tracing.record(
            TracedRequest(
                kind=self._kind,
                transport=self._transport,
                model=self._model,
                version=self._version if prediction is None else str(prediction.model.version),
                start_ns=self._start_ns,
                end_ns=end_ns,
                carrier=self._carrier,
                phases=phases,
                batch_size=None if prediction is None else prediction.rows,
                request_id=self._request_id,
                error=None if exc is None else (str(exc) or exc_type.__name__),  # type: ignore[union-attr]
                status_code=_status_code(exc, self._transport),
            )
        )


class _NoSpan:
    """What `request_span` hands out with tracing off: every call does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def identify(self, request_id: str | None) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        return None

    def decoded(self, ns: int) -> None:
        pass

    def predicted(self, prediction: Prediction) -> None:
        pass

    def ran(self, ns: int) -> None:
        pass

    def encoded(self, ns: int) -> None:
        pass


NO_SPAN = _NoSpan()


def request_span(
    tracing: Tracing | None,
    kind: str,
    transport: str,
    model: str,
    version: str | None,
    carrier: Mapping[str, str],
) -> RequestSpan | _NoSpan:
    """The span of one infer or compare request; with tracing off a shared no-op."""
    if tracing is None:
        return NO_SPAN
    return RequestSpan(tracing, kind, transport, model, version, carrier)


def _status_code(exc: BaseException | None, transport: str) -> int:
    """HTTP status or gRPC code number the request ended with, as the client saw it."""
    on_grpc = transport == "grpc"
    if exc is None:
        return grpc.StatusCode.OK.value[0] if on_grpc else 200
    if isinstance(exc, BnfoldServiceError):
        return grpc.StatusCode[exc.grpc_code].value[0] if on_grpc else exc.status_code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.value[0] if on_grpc else CLIENT_CLOSED_REQUEST
    return grpc.StatusCode.INTERNAL.value[0] if on_grpc else 500
