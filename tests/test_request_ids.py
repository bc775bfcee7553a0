"""Request ids: echoed, generated, validated, in error bodies, log lines and gRPC metadata.

Real servers (tests/service_server.py) and real clients (httpx, grpc). Log lines are
read from the process's real handler: `configure_logging` writing into a StringIO.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bnfold.service.request_log import MAX_REQUEST_ID_LENGTH, configure_logging
from bnfold.service.settings import LogFormat, LogLevel, Settings

from service_packages import MLP_IN
from service_server import RunningServer, grpc_settings, running_server

GENERATED = re.compile(r"[0-9a-f]{16}")
DEADLINE_SECONDS = 10.0


def mlp_body(**fields: object) -> dict:
    batch = np.arange(2 * MLP_IN, dtype=np.float32).reshape(2, MLP_IN) / 10
    return {
        "inputs": [
            {
                "name": "input",
                "shape": [2, MLP_IN],
                "datatype": "FP32",
                "data": batch.ravel().tolist(),
            }
        ],
        **fields,
    }


@pytest.fixture(scope="module")
def server(service_repository: Path) -> Iterator[RunningServer]:
    with running_server(Settings(repository=service_repository, device="cpu")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The process's logging as `bnfold serve --log-level debug` sets it, into a buffer;
    the previous configuration restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging(LogLevel.DEBUG, LogFormat.TEXT, stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def wait_for_line(stream: io.StringIO, *parts: str) -> str:
    """The first line holding every one of `parts` (log lines are written a moment later)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        for line in stream.getvalue().splitlines():
            if all(part in line for part in parts):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {parts}:\n{stream.getvalue()}")
        time.sleep(0.02)


def test_client_id_echoed(client: httpx.Client) -> None:
    response = client.get("/v2/health/live", headers={"X-Request-ID": "client-id-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-id-1"


def test_id_generated_when_absent_and_unique(client: httpx.Client) -> None:
    ids = [client.get("/v2/health/live").headers["x-request-id"] for _ in range(1000)]
    assert all(GENERATED.fullmatch(request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "bad",
    ["x" * (MAX_REQUEST_ID_LENGTH + 1), "has space", "tab\there", "caf\u00e9".encode("latin-1")],
    ids=["too-long", "space", "control", "non-ascii"],
)
def test_bad_id_replaced_not_echoed(client: httpx.Client, bad: str | bytes) -> None:
    response = client.get("/v2/health/live", headers={"X-Request-ID": bad})
    echoed = response.headers["x-request-id"]
    assert GENERATED.fullmatch(echoed), echoed


def test_longest_valid_id_kept(client: httpx.Client) -> None:
    longest = "a" * MAX_REQUEST_ID_LENGTH
    assert client.get("/v2", headers={"X-Request-ID": longest}).headers["x-request-id"] == longest


def test_id_in_404_error_body(client: httpx.Client) -> None:
    response = client.post(
        "/v2/models/no_such_model/infer", json=mlp_body(), headers={"X-Request-ID": "req-404"}
    )
    assert response.status_code == 404
    body = response.json()
    assert body["request_id"] == "req-404"
    assert "no_such_model" in body["error"]


def test_generated_id_in_503_error_body(client: httpx.Client) -> None:
    response = client.post("/v2/models/broken_hash/infer", json=mlp_body())
    assert response.status_code == 503
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert GENERATED.fullmatch(response.headers["x-request-id"])


def test_unknown_route_error_body_has_id(client: httpx.Client) -> None:
    response = client.get("/v2/nowhere", headers={"X-Request-ID": "lost-1"})
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "request_id": "lost-1"}


def test_v2_body_id_used_without_header(client: httpx.Client) -> None:
    response = client.post("/v2/models/mlp/infer", json=mlp_body(id="body-id-7"))
    assert response.status_code == 200
    assert response.json()["id"] == "body-id-7"
    assert response.headers["x-request-id"] == "body-id-7"


def test_header_id_wins_over_body_id(client: httpx.Client) -> None:
    response = client.post(
        "/v2/models/mlp/infer", json=mlp_body(id="body-id-8"), headers={"X-Request-ID": "hdr-8"}
    )
    assert response.headers["x-request-id"] == "hdr-8"
    assert response.json()["id"] == "body-id-8"


def test_id_in_log_line_emitted_while_handling(
    client: httpx.Client, log_output: io.StringIO
) -> None:
    """The data plane's own debug line about the run carries the request's id."""
    response = client.post(
        "/v2/models/mlp/versions/1/infer", json=mlp_body(), headers={"X-Request-ID": "log-me-1"}
    )
    assert response.status_code == 200
    line = wait_for_line(log_output, "infer mlp version 1")
    assert "[req=log-me-1]" in line
    # a line about no request (the test client's own, in this thread) has no tag
    assert "[req=" not in wait_for_line(log_output, "HTTP Request: POST", "versions/1/infer")


# ---------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def grpc_server(service_repository: Path) -> Iterator[RunningServer]:
    with running_server(grpc_settings(service_repository)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(grpc_server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(grpc_server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def trailing_id(call: grpc.Call) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


def infer_request(**fields: object) -> service_pb2.ModelInferRequest:
    batch = np.ones((1, MLP_IN), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp", **fields)
    request.inputs.add(name="input", datatype="FP32", shape=[1, MLP_IN])
    request.raw_input_contents.append(batch.tobytes())
    return request


def test_grpc_metadata_id_returned(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    _, call = stub.ServerLive.with_call(
        service_pb2.ServerLiveRequest(), metadata=(("x-request-id", "grpc-md-1"),)
    )
    assert trailing_id(call) == "grpc-md-1"


def test_grpc_id_generated_and_bad_one_replaced(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    _, plain = stub.ServerLive.with_call(service_pb2.ServerLiveRequest())
    _, bad = stub.ServerLive.with_call(
        service_pb2.ServerLiveRequest(), metadata=(("x-request-id", "y" * 129),)
    )
    assert GENERATED.fullmatch(trailing_id(plain))
    assert GENERATED.fullmatch(trailing_id(bad))
    assert trailing_id(plain) != trailing_id(bad)


def test_grpc_request_id_field_used(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    response, call = stub.ModelInfer.with_call(infer_request(id="grpc-body-3"))
    assert response.id == "grpc-body-3"
    assert trailing_id(call) == "grpc-body-3"
    _, both = stub.ModelInfer.with_call(
        infer_request(id="grpc-body-4"), metadata=(("x-request-id", "grpc-md-4"),)
    )
    assert trailing_id(both) == "grpc-md-4"


def test_grpc_error_carries_id(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name="no_such_model"),
            metadata=(("x-request-id", "grpc-404"),),
        )
    error = raised.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert dict(error.trailing_metadata())["x-request-id"] == "grpc-404"


def test_grpc_log_line_carries_id(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, log_output: io.StringIO
) -> None:
    stub.ModelInfer(infer_request(model_version="1"), metadata=(("x-request-id", "grpc-log-5"),))
    line = wait_for_line(log_output, "infer mlp version 1", "grpc-log-5")
    assert "[req=grpc-log-5]" in line
