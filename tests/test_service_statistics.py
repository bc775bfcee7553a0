"""Triton's statistics extension over real HTTP, read with tritonclient.http unchanged.

Every expected count comes from what the test sent: rows of the requests that
succeeded (inference_count), the runs the batcher must have made
(execution_count, batch_stats). The server's batcher is made deterministic:
max_batch_size 4 and a long max_queue_delay, so a request of 4 rows or more
runs at once and alone, and smaller ones wait until the queued rows reach 4 (or
the delay passes), whatever the machine's load. Durations are not asserted to
be any size, only to add up the way Triton defines them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from bnfold.service.protocol import ModelStatisticsResponse
from bnfold.service.settings import Settings

from service_packages import (
    MLP_IN,
    MLP_SEEDS,
    mlp_reference,
    mlp_weights,
    write_lookup,
    write_mlp,
)
from service_server import ADMIN_TOKEN, RunningServer, running_server

MAX_BATCH = 4
# Long enough that requests sent together are merged on any machine; a group whose rows
# fill MAX_BATCH never waits for it.
QUEUE_DELAY_US = 1_000_000
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("statistics") / "repository"
    for version, seed in MLP_SEEDS.items():
        write_mlp(root, "mlp", version, seed)
    write_lookup(root)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        repository=repository,
        device="cpu",
        admin_token=ADMIN_TOKEN,
        max_batch_size=MAX_BATCH,
        max_queue_delay_us=QUEUE_DELAY_US,
        concurrent_runs=1,
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(server.address, concurrency=8)
    yield client
    client.close()


def mlp_input(batch: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    return tensor


def check_mlp(result: triton_http.InferResult, version: str | None, batch: np.ndarray) -> None:
    """The answer to `batch` from `version` (None: unversioned, the latest), by numpy."""
    seed = MLP_SEEDS[int(version or max(MLP_SEEDS))]
    expected = mlp_reference(mlp_weights(seed), batch)["eval"]
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=64 * FLOAT32_EPS)


def infer_mlp(
    client: triton_http.InferenceServerClient, version: str | None, batch: np.ndarray
) -> None:
    """One request through tritonclient, its answer checked."""
    check_mlp(client.infer("mlp", [mlp_input(batch)], model_version=version or ""), version, batch)


def infer_together(
    client: triton_http.InferenceServerClient, version: str, batches: list[np.ndarray]
) -> None:
    """Requests in flight at once (tritonclient's async_infer), each answer checked."""
    pending = [
        client.async_infer("mlp", [mlp_input(batch)], model_version=version) for batch in batches
    ]
    for request, batch in zip(pending, batches, strict=True):
        check_mlp(request.get_result(), version, batch)


def rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, MLP_IN)).astype(np.float32)


def version_stats(client: triton_http.InferenceServerClient, name: str, version: str) -> dict:
    [stats] = client.get_inference_statistics(model_name=name, model_version=version)["model_stats"]
    assert (stats["name"], stats["version"]) == (name, version)
    return stats


def batch_runs(stats: dict) -> dict[int, int]:
    """Runs by batch size; the three phases are counted once per run each."""
    runs = {}
    for batch in stats["batch_stats"]:
        counts = {batch[phase]["count"] for phase in ("compute_input", "compute_infer")}
        counts.add(batch["compute_output"]["count"])
        assert len(counts) == 1, batch
        runs[batch["batch_size"]] = counts.pop()
    return runs


def assert_zero(stats: dict) -> None:
    assert stats["inference_count"] == stats["execution_count"] == stats["last_inference"] == 0
    assert all(value == {"count": 0, "ns": 0} for value in stats["inference_stats"].values())
    assert stats["batch_stats"] == []


def test_server_metadata_lists_the_extension(client: triton_http.InferenceServerClient) -> None:
    assert "statistics" in client.get_server_metadata()["extensions"]


def test_counts_rows_requests_and_runs_as_triton_does(
    client: triton_http.InferenceServerClient,
) -> None:
    """5 rows alone, 6 rows alone, then 1 + 3 rows merged into one run of 4: four requests,
    14 rows, three runs of sizes 4, 5 and 6."""
    assert_zero(version_stats(client, "mlp", "1"))
    before_ms = time.time_ns() // 1_000_000
    infer_mlp(client, "1", rows(5, 1))
    infer_mlp(client, "1", rows(6, 2))
    infer_together(client, "1", [rows(1, 3), rows(3, 4)])
    after_ms = time.time_ns() // 1_000_000

    stats = version_stats(client, "mlp", "1")
    assert stats["inference_count"] == 5 + 6 + 1 + 3
    assert stats["execution_count"] == 3
    assert batch_runs(stats) == {4: 1, 5: 1, 6: 1}
    assert before_ms <= stats["last_inference"] <= after_ms
    inference = stats["inference_stats"]
    for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[field]["count"] == 4, field
    assert inference["fail"] == {"count": 0, "ns": 0}
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}

    # compute_infer charges a run's whole time to each of its requests: the merged run of
    # 4 rows twice, the lone runs once
    by_size = {batch["batch_size"]: batch for batch in stats["batch_stats"]}
    infer_ns = {size: batch["compute_infer"]["ns"] for size, batch in by_size.items()}
    assert all(ns > 0 for ns in infer_ns.values())
    assert inference["compute_infer"]["ns"] == infer_ns[5] + infer_ns[6] + 2 * infer_ns[4]
    # only the merged run concatenates and splits; each request adds its decode / encode
    merged = by_size[4]
    assert merged["compute_input"]["ns"] > 0 and merged["compute_output"]["ns"] > 0
    for size in (5, 6):
        assert by_size[size]["compute_input"]["ns"] == by_size[size]["compute_output"]["ns"] == 0
    assert inference["compute_input"]["ns"] > 2 * merged["compute_input"]["ns"]
    assert inference["compute_output"]["ns"] > 2 * merged["compute_output"]["ns"]
    # a request's whole time holds its queue wait and its compute phases (1 µs of rounding
    # per request: the queue wait is measured in float seconds)
    parts = sum(
        inference[field]["ns"]
        for field in ("queue", "compute_input", "compute_infer", "compute_output")
    )
    assert inference["success"]["ns"] >= parts - 4 * 1000
    # the first of the merged requests waited in the queue for the second
    assert inference["queue"]["ns"] > 0
    ModelStatisticsResponse.model_validate(
        client.get_inference_statistics(model_name="mlp", model_version="1")
    )


def test_failures_after_the_model_is_known_count_as_fail(
    server: RunningServer, client: triton_http.InferenceServerClient
) -> None:
    """Tensors that do not fit (422) and a run onnxruntime refuses (422) count as fail; a
    body that cannot be read (400) and an unknown model (404) reach no model's counters."""
    lookup_before = version_stats(client, "lookup", "1")
    mlp_before = version_stats(client, "mlp", "2")
    wrong_width = {
        "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0, 1, 2]}]
    }
    outside_table = {
        "inputs": [{"name": "index", "shape": [4], "datatype": "INT64", "data": [1, 2, 99, 0]}]
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v2/models/mlp/versions/2/infer", json=wrong_width).status_code == 422
        assert http.post("/v2/models/mlp/versions/2/infer", content=b"{").status_code == 400
        assert http.post("/v2/models/nope/infer", json=wrong_width).status_code == 404
        assert http.post("/v2/models/lookup/infer", json=outside_table).status_code == 422

    mlp_after = version_stats(client, "mlp", "2")
    assert mlp_after["inference_stats"]["fail"]["count"] == (
        mlp_before["inference_stats"]["fail"]["count"] + 1
    )
    assert mlp_after["inference_stats"]["fail"]["ns"] > mlp_before["inference_stats"]["fail"]["ns"]
    assert mlp_after["inference_stats"]["success"] == mlp_before["inference_stats"]["success"]
    assert mlp_after["execution_count"] == mlp_before["execution_count"]

    lookup_after = version_stats(client, "lookup", "1")
    assert lookup_after["inference_stats"]["fail"]["count"] == (
        lookup_before["inference_stats"]["fail"]["count"] + 1
    )
    # the run failed: not an execution, no rows inferred
    assert lookup_after["execution_count"] == lookup_before["execution_count"]
    assert lookup_after["inference_count"] == lookup_before["inference_count"]
    assert lookup_after["batch_stats"] == lookup_before["batch_stats"]


def test_versions_count_apart_and_a_reload_starts_from_zero(
    server: RunningServer, client: triton_http.InferenceServerClient
) -> None:
    version_1 = version_stats(client, "mlp", "1")
    version_2 = version_stats(client, "mlp", "2")
    infer_mlp(client, "2", rows(4, 5))
    infer_mlp(client, None, rows(8, 6))

    after_2 = version_stats(client, "mlp", "2")
    assert after_2["inference_count"] == version_2["inference_count"] + 12
    assert after_2["execution_count"] == version_2["execution_count"] + 2
    assert batch_runs(after_2)[4] == batch_runs(version_2).get(4, 0) + 1
    assert batch_runs(after_2)[8] == batch_runs(version_2).get(8, 0) + 1
    assert version_stats(client, "mlp", "1") == version_1

    # the model's form lists every loaded version, the server's every loaded model's
    by_model = client.get_inference_statistics(model_name="mlp")["model_stats"]
    assert [(stats["name"], stats["version"]) for stats in by_model] == [("mlp", "1"), ("mlp", "2")]
    assert by_model == [version_1, after_2]
    everything = client.get_inference_statistics()["model_stats"]
    assert [(stats["name"], stats["version"]) for stats in everything] == [
        ("lookup", "1"),
        ("mlp", "1"),
        ("mlp", "2"),
    ]
    ModelStatisticsResponse.model_validate({"model_stats": everything})

    # unloading version 2 drops it from the statistics; loading it again starts from zero;
    # version 1 keeps counting through both
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=60) as http:
        assert http.post("/v2/repository/models/mlp/versions/2/unload").status_code == 200
        missing = http.get("/v2/models/mlp/versions/2/stats")
        assert missing.status_code == 404 and "version 2" in missing.json()["error"]
        remaining = client.get_inference_statistics(model_name="mlp")["model_stats"]
        assert [stats["version"] for stats in remaining] == ["1"]
        assert http.post("/v2/repository/models/mlp/versions/2/load").status_code == 200
    assert_zero(version_stats(client, "mlp", "2"))
    assert version_stats(client, "mlp", "1") == version_1


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("nope", "", "unknown model 'nope'"),
        ("nope", "1", "unknown model 'nope'"),
        ("mlp", "7", "version 7 is not loaded"),
        ("mlp", "latest", "'latest' is not a model version"),
    ],
)
def test_unknown_model_or_version_is_404(
    server: RunningServer,
    client: triton_http.InferenceServerClient,
    name: str,
    version: str,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException, match=message):
        client.get_inference_statistics(model_name=name, model_version=version)
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/stats"
    response = httpx.get(server.url + path, timeout=10)
    assert response.status_code == 404
    assert message in response.json()["error"]


def test_the_json_is_triton_grpc_message(client: triton_http.InferenceServerClient) -> None:
    """Every field name and type is the proto's (grpc_service.proto ModelStatistics): gRPC's
    ModelStatistics builds its answer from this JSON with ParseDict."""
    statistics = client.get_inference_statistics()
    message = json_format.ParseDict(statistics, service_pb2.ModelStatisticsResponse())
    assert [stats.name for stats in message.model_stats] == [
        stats["name"] for stats in statistics["model_stats"]
    ]
    first = statistics["model_stats"][0]
    assert message.model_stats[0].inference_count == first["inference_count"]
    assert (
        message.model_stats[0].inference_stats.success.ns
        == first["inference_stats"]["success"]["ns"]
    )


def test_openapi_documents_the_routes(server: RunningServer) -> None:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    for path in (
        "/v2/models/stats",
        "/v2/models/{model_name}/stats",
        "/v2/models/{model_name}/versions/{model_version}/stats",
    ):
        schema = paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ModelStatisticsResponse"}
        assert "404" in paths[path]["get"]["responses"]
