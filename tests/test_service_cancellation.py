"""A client that goes away while its request waits: the request is dropped before it runs.

Real uvicorn, real sockets: the client is a raw socket that sends a whole
request and closes the connection, as a client that gives up does. What the
server did about it is read from its own reports: the cancellation metric
(`bnfold_requests_cancelled_total` by stage), the requests metric (499, no
answer sent), and Triton's statistics (`execution_count`, `batch_stats`: the
runs that really happened). The batcher is made to hold requests: `mlp` runs
only when 4 rows are queued or a request has waited a second; `slow` runs at once but
each run takes about half a second (a Loop of small MatMuls, its length
measured on this machine).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.service.settings import Settings

from service_packages import MLP_IN, _model, mlp_reference, mlp_weights, write_mlp, write_package
from service_server import RunningServer, running_server

MAX_BATCH = 4
QUEUE_DELAY_SECONDS = 1.0  # the most a setting allows
SLOW_WIDTH = 64
SLOW_RUN_SECONDS = 0.5
MLP_SEED = 1
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def slow_model(iterations: int) -> onnx.ModelProto:
    """y = x, then `iterations` times y = tanh(y @ weight): slow, and exact to rerun."""
    step = helper.make_graph(
        [
            helper.make_node("Identity", ["condition"], ["condition_out"]),
            helper.make_node("MatMul", ["state", "weight"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", SLOW_WIDTH]),
        ],
        [
            helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", SLOW_WIDTH]),
        ],
    )
    weight = np.random.default_rng(0).normal(size=(SLOW_WIDTH, SLOW_WIDTH)) / np.sqrt(SLOW_WIDTH)
    graph = helper.make_graph(
        [helper.make_node("Loop", ["iterations", "keep_going", "x"], ["y"], body=step)],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        [
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "iterations"),
            numpy_helper.from_array(np.array(True), "keep_going"),
            numpy_helper.from_array(weight.astype(np.float32), "weight"),
        ],
    )
    return _model(graph)


def iterations_for(seconds: float) -> int:
    """How many loop steps take `seconds` on this machine (measured on 2000)."""
    probe = 2000
    session = ort.InferenceSession(
        slow_model(probe).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {"x": np.ones((1, SLOW_WIDTH), np.float32)}
    session.run(None, feeds)
    started = time.perf_counter()
    session.run(None, feeds)
    return max(probe, int(probe * seconds / (time.perf_counter() - started)))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cancellation") / "repository"
    write_mlp(root, "mlp", 1, MLP_SEED)
    write_package(root, "slow", 1, slow_model(iterations_for(SLOW_RUN_SECONDS)))
    # slow runs at once: the time it takes is its run's
    (root / "slow" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": MAX_BATCH, "max_queue_delay_us": 0}})
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        repository=repository,
        device="cpu",
        max_batch_size=MAX_BATCH,
        max_queue_delay_us=int(QUEUE_DELAY_SECONDS * 1e6),
        concurrent_runs=2,
        warmup=False,
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def slow_reference(repository: Path) -> ort.InferenceSession:
    path = repository / "slow" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- the client side


def infer_body(name: str, batch: np.ndarray) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.reshape(-1).tolist(),
                }
            ]
        }
    )


def send_and_hold(server: RunningServer, model: str, body: bytes) -> socket.socket:
    """A whole inference request on a raw connection, left open; close it to give up."""
    connection = socket.create_connection((server.host, server.port))
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    connection.sendall(head.encode() + body)
    return connection


def post(server: RunningServer, model: str, name: str, batch: np.ndarray) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=infer_body(name, batch), timeout=30
    )


def output_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def check_mlp(response: httpx.Response, batch: np.ndarray) -> None:
    expected = mlp_reference(mlp_weights(MLP_SEED), batch)["eval"]
    np.testing.assert_allclose(output_of(response), expected, rtol=0, atol=64 * FLOAT32_EPS)


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of /metrics, 0 when the series does not exist yet."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(
            f'{key}="{value}"' in line for key, value in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cancelled(server: RunningServer, model: str, stage: str) -> float:
    return metric(server, "bnfold_requests_cancelled_total", model=model, stage=stage)


def statistics(server: RunningServer, model: str) -> dict:
    [stats] = httpx.get(f"{server.url}/v2/models/{model}/versions/1/stats", timeout=10).json()[
        "model_stats"
    ]
    return stats


def runs_by_size(server: RunningServer, model: str) -> dict[int, int]:
    return {
        batch["batch_size"]: batch["compute_infer"]["count"]
        for batch in statistics(server, model)["batch_stats"]
    }


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def in_flight(server: RunningServer) -> float:
    """Inference requests the server is working on (here: waiting in a queue, or running)."""
    return metric(server, "bnfold_requests_in_flight", endpoint="infer")


# ---------------------------------------------------------------- tests


def test_a_request_dropped_while_queued_never_runs(server: RunningServer) -> None:
    queued_before = cancelled(server, "mlp", "queued")
    closed_before = metric(
        server, "bnfold_requests_total", model="mlp", endpoint="infer", code="499"
    )
    stats_before = statistics(server, "mlp")
    runs_before = runs_by_size(server, "mlp")
    lone = np.random.default_rng(1).normal(size=(1, MLP_IN)).astype(np.float32)

    connection = send_and_hold(server, "mlp", infer_body("input", lone))
    wait_for(lambda: in_flight(server) == 1, "the request to be queued")
    time.sleep(0.1)  # a request waiting 25-50 ms gets its connection watched
    connection.close()
    wait_for(lambda: cancelled(server, "mlp", "queued") == queued_before + 1, "the cancellation")
    assert in_flight(server) == 0
    assert (
        metric(server, "bnfold_requests_total", model="mlp", endpoint="infer", code="499")
        == closed_before + 1
    )

    # past the moment the batcher would have run it: nothing ran
    time.sleep(QUEUE_DELAY_SECONDS + 0.5)
    stats = statistics(server, "mlp")
    assert stats["execution_count"] == stats_before["execution_count"]
    assert stats["batch_stats"] == stats_before["batch_stats"]
    assert stats["inference_count"] == stats_before["inference_count"]
    fail = stats["inference_stats"]["fail"]
    assert fail["count"] == stats_before["inference_stats"]["fail"]["count"] + 1

    # and the next request is served at once (4 rows: a full batch)
    full = np.random.default_rng(2).normal(size=(MAX_BATCH, MLP_IN)).astype(np.float32)
    check_mlp(post(server, "mlp", "input", full), full)
    assert runs_by_size(server, "mlp") == {
        **runs_before,
        MAX_BATCH: runs_before.get(MAX_BATCH, 0) + 1,
    }


def test_a_cancelled_member_does_not_hold_up_the_others(server: RunningServer) -> None:
    """Three 1-row requests queue; the first gives up; a 2-row request then makes 4 rows
    with the other two: they run at once as one batch of 4, without the cancelled row."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(rows, MLP_IN)).astype(np.float32) for rows in (1, 1, 1, 2)]
    queued_before = cancelled(server, "mlp", "queued")
    runs_before = runs_by_size(server, "mlp")

    with ThreadPoolExecutor(3) as pool:
        connection = send_and_hold(server, "mlp", infer_body("input", batches[0]))
        wait_for(lambda: in_flight(server) == 1, "the first request to be queued")
        started = time.monotonic()
        waiting = [pool.submit(post, server, "mlp", "input", batch) for batch in batches[1:3]]
        wait_for(lambda: in_flight(server) == 3, "three queued requests")
        time.sleep(0.1)
        connection.close()
        wait_for(lambda: cancelled(server, "mlp", "queued") == queued_before + 1, "the cancel")
        last = pool.submit(post, server, "mlp", "input", batches[3])
        responses = [future.result() for future in [*waiting, last]]
        elapsed = time.monotonic() - started

    for batch, response in zip(batches[1:], responses, strict=True):
        check_mlp(response, batch)
    # they did not wait for the queue delay
    assert elapsed < QUEUE_DELAY_SECONDS
    assert runs_by_size(server, "mlp") == {
        **runs_before,
        MAX_BATCH: runs_before.get(MAX_BATCH, 0) + 1,
    }


def test_a_request_cancelled_while_running_finishes_and_is_dropped(
    server: RunningServer, slow_reference: ort.InferenceSession
) -> None:
    rng = np.random.default_rng(4)
    first, abandoned, after = (
        rng.normal(size=(1, SLOW_WIDTH)).astype(np.float32) for _ in range(3)
    )
    [expected] = slow_reference.run(None, {"x": first})
    np.testing.assert_array_equal(output_of(post(server, "slow", "x", first)), expected)
    stats = statistics(server, "slow")
    run_seconds = stats["inference_stats"]["compute_infer"]["ns"] / 1e9
    running_before = cancelled(server, "slow", "running")

    connection = send_and_hold(server, "slow", infer_body("x", abandoned))
    wait_for(lambda: in_flight(server) == 1, "the request to arrive")
    time.sleep(run_seconds / 3)
    connection.close()
    wait_for(lambda: cancelled(server, "slow", "running") == running_before + 1, "the cancel")
    # its run finishes (an execution of one row) but nobody counts it as answered
    wait_for(
        lambda: statistics(server, "slow")["execution_count"] == stats["execution_count"] + 1,
        "the abandoned run to finish",
    )
    finished = statistics(server, "slow")
    assert finished["inference_stats"]["success"]["count"] == 1
    assert finished["inference_stats"]["fail"]["count"] == 1
    assert finished["inference_count"] == 1

    [expected] = slow_reference.run(None, {"x": after})
    np.testing.assert_array_equal(output_of(post(server, "slow", "x", after)), expected)
    assert statistics(server, "slow")["inference_stats"]["success"]["count"] == 2
