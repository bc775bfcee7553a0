"""Tracing end to end: a real server whose spans go to the SDK's in-memory exporter.

The client's W3C traceparent (an HTTP header, gRPC metadata) becomes the
parent of the request's span; decode, queue, run and encode are its children,
inside it and in order; a refused request is marked as an error with its
status; health, metadata and metrics requests are never traced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bnfold.service.tracing import Tracing

from service_server import RunningServer, grpc_settings, running_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class TracedServer:
    server: RunningServer
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="module")
def traced(digits_repository: Path) -> Iterator[TracedServer]:
    exporter = InMemorySpanExporter()
    tracing = Tracing(SimpleSpanProcessor(exporter), "test")
    with running_server(grpc_settings(digits_repository), tracing=tracing) as server:
        yield TracedServer(server, exporter)


@pytest.fixture()
def fresh(traced: TracedServer) -> TracedServer:
    traced.exporter.clear()
    return traced


def _digits(rows: int) -> np.ndarray:
    return np.random.default_rng(0).random((rows, 64), dtype=np.float32)


def _v2(batch: np.ndarray, request_id: str = "req-7") -> dict:
    return {
        "id": request_id,
        "inputs": [
            {
                "name": "input",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "data": batch.ravel().tolist(),
            }
        ],
    }


def _tree(
    spans: list[ReadableSpan], root_name: str
) -> tuple[ReadableSpan, dict[str, ReadableSpan]]:
    roots = [span for span in spans if span.name == root_name]
    assert len(roots) == 1, [span.name for span in spans]
    root = roots[0]
    children = {
        span.name: span
        for span in spans
        if span.parent is not None and span.parent.span_id == root.context.span_id
    }
    return root, children


def test_rest_infer_continues_the_clients_trace(fresh: TracedServer) -> None:
    url = fresh.server.url
    answer = httpx.post(
        f"{url}/v2/models/digits_mlp/infer",
        json=_v2(_digits(3)),
        headers={"traceparent": TRACEPARENT},
    )
    assert answer.status_code == 200
    root, children = _tree(fresh.spans(), "infer digits_mlp")
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert root.attributes["bnfold.model.version"] == "1"
    assert root.attributes["bnfold.batch_size"] == 3
    assert root.attributes["bnfold.request_id"] == "req-7"
    assert root.attributes["http.response.status_code"] == 200
    assert root.status.status_code is StatusCode.UNSET
    assert list(children) == ["decode", "queue", "run", "encode"]
    previous_end = root.start_time
    for child in children.values():
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
        assert child.start_time >= previous_end - 1  # laid end to end, in order
        previous_end = child.end_time


def test_grpc_infer_takes_the_traceparent_from_metadata(fresh: TracedServer) -> None:
    client = grpcclient.InferenceServerClient(fresh.server.grpc_address)
    batch = _digits(2)
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    client.infer("digits_mlp", [tensor], request_id="g-1", headers={"traceparent": TRACEPARENT})
    client.close()
    root, children = _tree(fresh.spans(), "infer digits_mlp")
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.grpc.status_code"] == 0
    assert root.attributes["bnfold.request_id"] == "g-1"
    assert set(children) == {"decode", "queue", "run", "encode"}


def test_compare_and_a_refused_request(fresh: TracedServer) -> None:
    url = fresh.server.url
    assert (
        httpx.post(f"{url}/v2/models/digits_mlp/compare", json=_v2(_digits(4))).status_code == 200
    )
    root, children = _tree(fresh.spans(), "compare digits_mlp")
    assert root.parent is None  # no traceparent: a new trace
    assert list(children) == ["decode", "run"]

    fresh.exporter.clear()
    wrong = _v2(_digits(2))
    wrong["inputs"][0]["shape"] = [2, 63]
    wrong["inputs"][0]["data"] = wrong["inputs"][0]["data"][:126]
    assert httpx.post(f"{url}/v2/models/digits_mlp/infer", json=wrong).status_code == 422
    root, _ = _tree(fresh.spans(), "infer digits_mlp")
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["http.response.status_code"] == 422


def test_health_metadata_and_metrics_are_not_traced(fresh: TracedServer) -> None:
    url = fresh.server.url
    for path in (
        "/v2/health/ready",
        "/v2/health/live",
        "/v2",
        "/v2/models/digits_mlp",
        "/metrics",
        "/v2/models/digits_mlp/stats",
    ):
        assert httpx.get(f"{url}{path}").status_code == 200
    client = grpcclient.InferenceServerClient(fresh.server.grpc_address)
    assert client.is_server_ready()
    client.close()
    assert fresh.spans() == []


def test_without_an_endpoint_tracing_is_off(digits_repository: Path) -> None:
    with running_server(grpc_settings(digits_repository, grpc=False)) as server:
        assert server.app.state.tracing is None
        assert server.app.state.dataplane.tracing is None
        assert (
            httpx.post(f"{server.url}/v2/models/digits_mlp/infer", json=_v2(_digits(1))).status_code
            == 200
        )


def test_spans_reach_an_otlp_http_collector(digits_repository: Path) -> None:
    """`--otlp-endpoint`: the batch processor posts OTLP/HTTP protobuf; the server flushes
    what it holds when it stops. The collector here is a plain HTTP server on 127.0.0.1."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
        settings = grpc_settings(digits_repository, grpc=False, otlp_endpoint=endpoint)
        with running_server(settings) as server:
            answer = httpx.post(
                f"{server.url}/v2/models/digits_mlp/infer",
                json=_v2(_digits(2)),
                headers={"traceparent": TRACEPARENT},
            )
            assert answer.status_code == 200
    finally:
        collector.shutdown()
        thread.join(5)
    assert received, "the server exported nothing to the collector"
    path, content_type, body = received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    export = ExportTraceServiceRequest.FromString(body)
    spans = [span for rs in export.resource_spans for ss in rs.scope_spans for span in ss.spans]
    names = {span.name for span in spans}
    assert {"infer digits_mlp", "decode", "queue", "run", "encode"} <= names
    root = next(span for span in spans if span.name == "infer digits_mlp")
    assert root.trace_id.hex() == TRACE_ID
    assert root.parent_span_id.hex() == PARENT_ID
