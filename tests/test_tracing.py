"""Tracing's span tree, built from measured phases, with the SDK's in-memory exporter."""

from __future__ import annotations

import time

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bnfold.service.tracing import Phase, TracedRequest, Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing(SimpleSpanProcessor(exporter), "0.0-test"), exporter


def test_a_request_continues_the_clients_trace_with_one_child_per_phase() -> None:
    tracing, exporter = _tracing()
    start = time.time_ns()
    phases = [
        Phase("decode", start + 10, start + 20),
        Phase("queue", start + 20, start + 50),
        Phase("run", start + 50, start + 90),
        Phase("encode", start + 90, start + 99),
    ]
    tracing.record(
        TracedRequest(
            kind="infer",
            transport="http",
            model="digits_mlp",
            version="1",
            start_ns=start,
            end_ns=start + 100,
            # header names arrive in any case
            carrier={"Traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            phases=phases,
            batch_size=4,
            request_id="r-1",
            status_code=200,
        )
    )
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"infer digits_mlp", "decode", "queue", "run", "encode"}
    root = spans["infer digits_mlp"]
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert (root.start_time, root.end_time) == (start, start + 100)
    assert root.attributes["bnfold.model.version"] == "1"
    assert root.attributes["bnfold.batch_size"] == 4
    assert root.attributes["http.response.status_code"] == 200
    assert root.resource.attributes["service.name"] == "bnfold"
    for phase in phases:
        child = spans[phase.name]
        assert child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
        assert (child.start_time, child.end_time) == (phase.start_ns, phase.end_ns)


def test_without_a_traceparent_a_new_trace_starts_and_errors_are_marked() -> None:
    tracing, exporter = _tracing()
    now = time.time_ns()
    for _ in range(2):
        tracing.record(
            TracedRequest(
                kind="infer",
                transport="grpc",
                model="m",
                version=None,
                start_ns=now,
                end_ns=now + 5,
                carrier={"traceparent": "not a traceparent"},
                error="shape mismatch",
                status_code=3,
            )
        )
    first, second = exporter.get_finished_spans()
    assert first.parent is None and second.parent is None
    assert first.context.trace_id != second.context.trace_id
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "shape mismatch"
    assert first.attributes["rpc.system"] == "grpc"
    assert first.attributes["rpc.grpc.status_code"] == 3
    assert "bnfold.model.version" not in first.attributes
