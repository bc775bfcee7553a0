"""The REST API over a real uvicorn server with httpx: endpoints, both tensor encodings, every error.

Numbers are checked against `mlp_reference`, a float64 numpy re-computation of
the test MLP, independent of onnxruntime and of the folding.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bnfold.service.protocol import (
    CompareResponse,
    ErrorResponse,
    InferenceResponse,
    ModelConfigResponse,
    ModelMetadataResponse,
    RepositoryModel,
    ServerMetadataResponse,
)
from bnfold.service.settings import Settings

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights
from service_server import RunningServer, running_server

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def float32_tolerance(reference: np.ndarray) -> float:
    """32 float32 ulps of the output's scale: the test MLP's two Gemms (<= 16 terms each)
    round a few times per term; a wrong fold or a wrong version is off by > 1e-2."""
    return 32 * FLOAT32_EPS * float(np.abs(reference).max())


@pytest.fixture(scope="module")
def client(service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)


def _mlp_request(batch: np.ndarray, **fields: object) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "data": batch.tolist(),
            }
        ],
        **fields,
    }


def _error(response: httpx.Response, status: int) -> str:
    """The V2 error body `{"error": "..."}` with the expected status; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return ErrorResponse.model_validate(response.json()).error


# ---------------------------------------------------------------- health and metadata


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    metadata = ServerMetadataResponse.model_validate(client.get("/v2").json())
    assert metadata.name == "bnfold"
    assert {"binary_tensor_data", "model_repository", "model_configuration"} <= set(
        metadata.extensions
    )


def test_model_metadata_serves_the_highest_version(client: httpx.Client) -> None:
    metadata = ModelMetadataResponse.model_validate(client.get("/v2/models/mlp").json())
    assert metadata.platform == "onnxruntime_onnx"
    assert metadata.versions == ["1", "2"]
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("input", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [
        ("output", "FP32", [-1, 4])
    ]
    assert metadata.parameters["version"] == "2"
    assert metadata.parameters["execution_providers"] == ["CPUExecutionProvider"]
    assert metadata.parameters["batchnorm_layers"] == ["bn1"]
    versioned = client.get("/v2/models/mlp/versions/1").json()
    assert versioned["parameters"]["version"] == "1"


def test_model_ready_and_config(client: httpx.Client) -> None:
    assert client.get("/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    assert client.get("/v2/models/mlp/versions/1/ready").status_code == 200
    config = ModelConfigResponse.model_validate(client.get("/v2/models/dtypes/config").json())
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert [(t.name, t.data_type, t.dims) for t in config.input] == [
        ("a", "TYPE_FP64", [-1, 3]),
        ("b", "TYPE_INT32", [-1, 3]),
        ("c", "TYPE_BOOL", [-1, 3]),
        ("d", "TYPE_FP16", [-1, 3]),
    ]
    assert client.get("/v2/models/mlp/versions/1/config").json()["name"] == "mlp"


def test_repository_index_lists_broken_packages_with_their_reason(client: httpx.Client) -> None:
    index = [
        RepositoryModel.model_validate(entry)
        for entry in client.post("/v2/repository/index").json()
    ]
    by_name = {(entry.name, entry.version): entry for entry in index}
    assert {key for key, entry in by_name.items() if entry.state == "READY"} == {
        ("dtypes", "1"),
        ("mlp", "1"),
        ("mlp", "2"),
        ("pixels", "1"),
    }
    assert "sha256 of model.onnx" in by_name[("broken_hash", "1")].reason
    assert (
        "train.onnx is listed in manifest.json but missing" in by_name[("missing_file", "1")].reason
    )
    ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
    assert {entry["state"] for entry in ready_only} == {"READY"} and len(ready_only) == 4


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("version", sorted(MLP_SEEDS))
def test_json_inference_matches_the_reference(
    client: httpx.Client, batch: np.ndarray, version: int
) -> None:
    response = client.post(
        f"/v2/models/mlp/versions/{version}/infer", json=_mlp_request(batch, id="req-7")
    )
    assert response.status_code == 200, response.text
    body = InferenceResponse.model_validate(response.json())
    assert (body.model_name, body.model_version, body.id) == ("mlp", str(version), "req-7")
    [output] = body.outputs
    assert (output.name, output.datatype, output.shape) == ("output", "FP32", [5, 4])
    expected = mlp_reference(mlp_weights(MLP_SEEDS[version]), batch)["eval"]
    actual = np.asarray(output.data, dtype=np.float32).reshape(5, 4)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=float32_tolerance(expected))


def test_unversioned_inference_is_the_highest_version(
    client: httpx.Client, batch: np.ndarray
) -> None:
    latest = client.post("/v2/models/mlp/infer", json=_mlp_request(batch)).json()
    explicit = client.post("/v2/models/mlp/versions/2/infer", json=_mlp_request(batch)).json()
    assert latest["model_version"] == "2" and latest["outputs"] == explicit["outputs"]
    assert "id" not in latest


def test_flat_data_equals_nested_data(client: httpx.Client, batch: np.ndarray) -> None:
    flat = _mlp_request(batch)
    flat["inputs"][0]["data"] = batch.reshape(-1).tolist()
    assert (
        client.post("/v2/models/mlp/infer", json=flat).json()
        == client.post("/v2/models/mlp/infer", json=_mlp_request(batch)).json()
    )


def _binary_request(batch: np.ndarray, outputs: list[dict] | None) -> tuple[bytes, dict[str, str]]:
    header: dict = {
        "inputs": [
            {
                "name": "input",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": batch.nbytes},
            }
        ]
    }
    if outputs is not None:
        header["outputs"] = outputs
    json_header = orjson.dumps(header)
    return json_header + batch.tobytes(), {
        "Inference-Header-Content-Length": str(len(json_header)),
        "Content-Type": "application/octet-stream",
    }


def test_binary_inputs_and_outputs_over_raw_http(client: httpx.Client, batch: np.ndarray) -> None:
    body, headers = _binary_request(
        batch, [{"name": "output", "parameters": {"binary_data": True}}]
    )
    response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    header_length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:header_length])
    [output] = header["outputs"]
    assert output["parameters"] == {"binary_data_size": 5 * 4 * 4} and "data" not in output
    binary = np.frombuffer(response.content[header_length:], dtype=np.float32).reshape(5, 4)
    as_json = client.post("/v2/models/mlp/infer", json=_mlp_request(batch)).json()["outputs"][0]
    # orjson writes float32 as the shortest decimal that reads back to the same float32
    np.testing.assert_array_equal(
        binary, np.asarray(as_json["data"], dtype=np.float32).reshape(5, 4)
    )


def test_binary_inputs_with_json_outputs(client: httpx.Client, batch: np.ndarray) -> None:
    body, headers = _binary_request(batch, None)
    response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert "inference-header-content-length" not in response.headers
    assert response.json()["outputs"][0]["shape"] == [5, 4]


def test_all_datatypes_round_trip(client: httpx.Client) -> None:
    a = np.array([[0.25, 1e300, -2.0]], dtype=np.float64)
    b = np.array([[1, -(2**31), 2**31 - 1]], dtype=np.int32)
    c = np.array([[True, False, True]])
    d = np.array([[0.5, -1.5, 1000.0]], dtype=np.float16)
    request = {
        "inputs": [
            {"name": name, "shape": [1, 3], "datatype": datatype, "data": array.tolist()}
            for name, datatype, array in (
                ("a", "FP64", a),
                ("b", "INT32", b),
                ("c", "BOOL", c),
                ("d", "FP16", d),
            )
        ],
        "outputs": [
            {"name": "sum"},
            {"name": "mask"},
            {"name": "half", "parameters": {"binary_data": True}},
            {"name": "wide"},
        ],
    }
    response = client.post("/v2/models/dtypes/infer", json=request)
    assert response.status_code == 200, response.text
    header_length = int(response.headers["inference-header-content-length"])
    outputs = {
        entry["name"]: entry for entry in orjson.loads(response.content[:header_length])["outputs"]
    }
    expected_sum = a + b + c + d.astype(np.float64)
    np.testing.assert_array_equal(np.asarray(outputs["sum"]["data"]).reshape(1, 3), expected_sum)
    assert outputs["mask"]["datatype"] == "BOOL" and outputs["mask"]["data"] == [False, True, False]
    half = np.frombuffer(response.content[header_length:], dtype=np.float16).reshape(1, 3)
    np.testing.assert_array_equal(half, d * 2)
    assert (
        outputs["wide"]["datatype"] == "INT64" and outputs["wide"]["data"] == b.reshape(-1).tolist()
    )


def test_outputs_selects_outputs(client: httpx.Client) -> None:
    request = {
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]},
            {"name": "b", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]},
            {"name": "c", "shape": [1, 3], "datatype": "BOOL", "data": [True, True, True]},
            {"name": "d", "shape": [1, 3], "datatype": "FP16", "data": [1, 2, 3]},
        ],
        "outputs": [{"name": "wide"}],
    }
    outputs = client.post("/v2/models/dtypes/infer", json=request).json()["outputs"]
    assert [output["name"] for output in outputs] == ["wide"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{oops", "malformed JSON"),
        (b"", "'inputs' must be a non-empty array"),
        (
            b'{"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": [1]}]}',
            "1 values",
        ),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "F32", "data": []}]}',
            "unsupported datatype",
        ),
    ],
)
def test_400_unreadable_requests(client: httpx.Client, content: bytes, message: str) -> None:
    response = client.post(
        "/v2/models/mlp/infer", content=content, headers={"Content-Type": "application/json"}
    )
    assert message in _error(response, 400)


def test_400_binary_framing(client: httpx.Client, batch: np.ndarray) -> None:
    body, headers = _binary_request(batch, None)
    bad_length = {**headers, "Inference-Header-Content-Length": str(len(body) + 1)}
    assert "Inference-Header-Content-Length" in _error(
        client.post("/v2/models/mlp/infer", content=body, headers=bad_length), 400
    )
    truncated = client.post("/v2/models/mlp/infer", content=body[:-4], headers=headers)
    assert "binary_data_size 160 runs past the end" in _error(truncated, 400)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_422_non_finite_binary_inputs_json_numbers_need_no_second_look(
    client: httpx.Client, batch: np.ndarray, bad: float
) -> None:
    """Binary tensors are scanned for NaN and infinity; JSON numbers cannot hold them
    (the decoder marks them finite and the scan skips them), and still answer the same."""
    spoiled = batch.copy()
    spoiled[2, 3] = bad
    body, headers = _binary_request(spoiled, None)
    message = _error(client.post("/v2/models/mlp/infer", content=body, headers=headers), 422)
    assert message == (
        "input 'input' contains NaN or infinity: the service takes finite values only"
    )
    as_json = client.post("/v2/models/mlp/infer", json=_mlp_request(batch))
    body, headers = _binary_request(batch, None)
    as_binary = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert as_json.status_code == as_binary.status_code == 200
    assert as_json.json()["outputs"] == as_binary.json()["outputs"]


def test_422_shape_mismatch_names_the_expected_shape(client: httpx.Client) -> None:
    wrong = _mlp_request(np.zeros((2, 7), dtype=np.float32))
    message = _error(client.post("/v2/models/mlp/infer", json=wrong), 422)
    assert message == "input 'input' has shape [2, 7] but the model expects [-1, 8] (-1: any size)"
    rank = _mlp_request(np.zeros((2, 8, 1), dtype=np.float32))
    assert "[-1, 8]" in _error(client.post("/v2/models/mlp/infer", json=rank), 422)


def test_422_datatype_names_and_outputs(client: httpx.Client, batch: np.ndarray) -> None:
    as_double = _mlp_request(batch)
    as_double["inputs"][0]["datatype"] = "FP64"
    assert "is FP64 but the model expects FP32" in _error(
        client.post("/v2/models/mlp/infer", json=as_double), 422
    )
    renamed = _mlp_request(batch)
    renamed["inputs"][0]["name"] = "x"
    assert "unknown input 'x': mlp takes input" in _error(
        client.post("/v2/models/mlp/infer", json=renamed), 422
    )
    extra_output = _mlp_request(batch, outputs=[{"name": "logits"}])
    assert "unknown output 'logits'" in _error(
        client.post("/v2/models/mlp/infer", json=extra_output), 422
    )
    partial = {"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}]}
    assert "missing input 'b'" in _error(client.post("/v2/models/dtypes/infer", json=partial), 422)


def test_422_inputs_disagreeing_on_the_batch(client: httpx.Client) -> None:
    request = {
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]},
            {"name": "b", "shape": [2, 3], "datatype": "INT32", "data": [1] * 6},
            {"name": "c", "shape": [1, 3], "datatype": "BOOL", "data": [True] * 3},
            {"name": "d", "shape": [1, 3], "datatype": "FP16", "data": [1] * 3},
        ]
    }
    assert "disagree on the batch size" in _error(
        client.post("/v2/models/dtypes/infer", json=request), 422
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/nope/config",
        "/v2/models/mlp/versions/3",
        "/v2/models/mlp/versions/0/ready",
        "/v2/models/mlp/versions/latest/config",
        "/v2/models/..%2F..%2Fetc%2Fpasswd",
        "/v2/models/%00",
        "/v2/models/%2E%2E/ready",
        "/v2/nothing/here",
    ],
)
def test_404_unknown_models_versions_and_routes(client: httpx.Client, path: str) -> None:
    _error(client.get(path), 404)


def test_404_on_infer_and_compare(client: httpx.Client, batch: np.ndarray) -> None:
    for path in (
        "/v2/models/nope/infer",
        "/v2/models/mlp/versions/9/compare",
        "/v2/models/%2E%2E/infer",
    ):
        _error(client.post(path, json=_mlp_request(batch)), 404)


def test_405_is_a_v2_error_too(client: httpx.Client) -> None:
    _error(client.get("/v2/models/mlp/infer"), 405)


def test_503_broken_packages_never_answer(client: httpx.Client, batch: np.ndarray) -> None:
    message = _error(client.post("/v2/models/broken_hash/infer", json=_mlp_request(batch)), 503)
    assert "sha256 of model.onnx" in message
    assert "missing" in _error(client.get("/v2/models/missing_file/ready"), 503)
    _error(client.get("/v2/models/broken_hash/versions/1"), 503)


def test_415_unknown_content_encoding(client: httpx.Client, batch: np.ndarray) -> None:
    response = client.post(
        "/v2/models/mlp/infer",
        content=orjson.dumps(_mlp_request(batch)),
        headers={"Content-Encoding": "br", "Content-Type": "application/json"},
    )
    _error(response, 415)


def test_gzip_request_bodies(client: httpx.Client, batch: np.ndarray) -> None:
    plain = orjson.dumps(_mlp_request(batch))
    response = client.post(
        "/v2/models/mlp/infer",
        content=gzip.compress(plain),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json() == client.post("/v2/models/mlp/infer", content=plain).json()
    broken = client.post(
        "/v2/models/mlp/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"}
    )
    _error(broken, 400)


def test_garbage_is_never_a_500(client: httpx.Client) -> None:
    """Structurally odd bodies, one per field of the protocol: all client errors."""
    tensor = {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}
    bodies: list[object] = [
        None,
        1,
        "text",
        {"inputs": None},
        {"inputs": [None]},
        {"inputs": [{**tensor, "shape": "1,8"}]},
        {"inputs": [{**tensor, "shape": [1, True]}]},
        {"inputs": [{**tensor, "data": [[[[]]]]}]},
        {"inputs": [{**tensor, "data": [None] * 8}]},
        {"inputs": [{**tensor, "data": [{}] * 8}]},
        {"inputs": [{**tensor, "parameters": []}]},
        {"inputs": [{**tensor, "parameters": {"binary_data_size": "8"}}]},
        {"inputs": [tensor], "outputs": {}},
        {"inputs": [tensor], "outputs": [{"name": 1}]},
        {"inputs": [tensor], "outputs": [{"name": "output", "parameters": {"binary_data": 1}}]},
        {"inputs": [tensor], "parameters": {"binary_data_output": "yes"}},
    ]
    for body in bodies:
        for endpoint in ("infer", "compare"):
            response = client.post(f"/v2/models/mlp/{endpoint}", content=orjson.dumps(body))
            assert 400 <= response.status_code < 500, (endpoint, body, response.text)
            ErrorResponse.model_validate(response.json())
    not_a_flag = {"inputs": [tensor, {**tensor, "name": "other"}], "return_outputs": 3}
    assert "'return_outputs' must be a boolean" in _error(
        client.post("/v2/models/mlp/compare", json=not_a_flag), 400
    )
    index = client.post("/v2/repository/index", json={"ready": "yes"})
    assert "'ready' must be a boolean" in _error(index, 400)


def test_empty_batch_infers_but_does_not_compare(client: httpx.Client) -> None:
    empty = _mlp_request(np.zeros((0, 8), dtype=np.float32))
    response = client.post("/v2/models/mlp/infer", json=empty)
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [0, 4]
    assert "non-empty batch" in _error(client.post("/v2/models/mlp/compare", json=empty), 422)


def test_an_empty_outputs_list_means_every_output(client: httpx.Client, batch: np.ndarray) -> None:
    """The V2 spec: outputs not specified -> all outputs. `[]` was a 500 with two tracebacks
    alone, and a 200 without outputs when the batcher merged it with other requests."""
    expected = client.post("/v2/models/mlp/infer", json=_mlp_request(batch)).json()
    assert client.post("/v2/models/mlp/infer", json=_mlp_request(batch, outputs=[])).json() == (
        expected
    )
    body, headers = _binary_request(batch, [])
    binary = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert binary.status_code == 200 and binary.json() == expected
    compare = client.post("/v2/models/mlp/compare", json=_mlp_request(batch, outputs=[]))
    assert compare.status_code == 200
    assert [output["name"] for output in compare.json()["outputs"]] == ["output"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=10) as http:
            requests = [
                http.post("/v2/models/mlp/infer", json=_mlp_request(batch, outputs=outputs))
                for outputs in ([], None, [{"name": "output"}]) * 8
            ]
            return await asyncio.gather(*requests)

    for response in asyncio.run(burst()):
        assert response.status_code == 200, response.text
        assert response.json()["outputs"] == expected["outputs"]


def test_nesting_that_disagrees_with_the_shape_is_refused(client: httpx.Client) -> None:
    """Six values nested as 3x2 for shape [2, 3]: the element count fits, the layout does not."""
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 8],
                "datatype": "FP32",
                "data": np.zeros((4, 4)).tolist(),
            }
        ]
    }
    message = _error(client.post("/v2/models/mlp/infer", json=request), 400)
    assert "nested as [4, 4] but the shape is [2, 8]" in message


# ---------------------------------------------------------------- body limit


@pytest.fixture(scope="module")
def small_limit_service(service_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(repository=service_repository, device="cpu", max_body_bytes=4096)
    with running_server(settings) as server:
        yield server


def test_413_declared_streamed_and_inflated(small_limit_service: RunningServer) -> None:
    big = orjson.dumps(_mlp_request(np.zeros((200, 8), dtype=np.float32)))
    assert len(big) > 4096
    with httpx.Client(base_url=small_limit_service.url, timeout=10) as client:
        assert "4096-byte limit" in _error(client.post("/v2/models/mlp/infer", content=big), 413)

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        chunked = client.post("/v2/models/mlp/infer", content=chunks())
        assert "over the 4096-byte limit" in _error(chunked, 413)
        bomb = gzip.compress(b" " * 100_000 + b"{}")
        inflated = client.post(
            "/v2/models/mlp/infer", content=bomb, headers={"Content-Encoding": "gzip"}
        )
        assert "decompressed request body" in _error(inflated, 413)
        small = _mlp_request(np.zeros((2, 8), dtype=np.float32))
        assert client.post("/v2/models/mlp/infer", json=small).status_code == 200


def test_413_default_limit_is_64_mib_and_checked_before_reading(service: RunningServer) -> None:
    """Declare one byte over 64 MiB and send nothing: the answer comes from the header alone."""
    request = (
        "POST /v2/models/mlp/infer HTTP/1.1\r\n"
        f"Host: {service.address}\r\n"
        f"Content-Length: {64 * 2**20 + 1}\r\n"
        "Content-Type: application/json\r\n\r\n"
    )
    with socket.create_connection((service.host, service.port), timeout=10) as connection:
        connection.sendall(request.encode())
        reply = connection.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413")
    assert f"{64 * 2**20 + 1} bytes is over the {64 * 2**20}-byte limit" in reply


# ---------------------------------------------------------------- metrics and docs


def test_metrics(client: httpx.Client, batch: np.ndarray) -> None:
    client.post(
        "/v2/models/pixels/infer",
        json={
            "inputs": [
                {"name": "image", "shape": [3, 2, 3, 3], "datatype": "FP32", "data": [0.0] * 54}
            ]
        },
    )
    client.post(
        "/v2/models/pixels/infer",
        json={"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}]},
    )
    client.post("/v2/models/unknown-model-name/infer", json=_mlp_request(batch))
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    def sample(name: str, **labels: str) -> float:
        pattern = re.escape(name) + r"\{([^}]*)\} (\S+)"
        for found in re.finditer(pattern, text):
            found_labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
            if labels.items() <= found_labels.items():
                return float(found.group(2))
        raise AssertionError(f"no {name} with {labels}")

    assert sample("bnfold_requests_total", model="pixels", endpoint="infer", outcome="ok") >= 1
    assert sample("bnfold_requests_total", model="pixels", outcome="client_error", code="422") >= 1
    assert sample("bnfold_requests_total", model="_unknown", code="404") >= 1
    assert "unknown-model-name" not in text
    assert sample("bnfold_queue_duration_seconds_count", model="pixels") >= 1
    assert sample("bnfold_compute_duration_seconds_count", model="pixels", graph="eval") >= 1
    assert sample("bnfold_batch_size_bucket", model="pixels", endpoint="infer", le="4.0") >= 1
    assert sample("bnfold_request_duration_seconds_count", model="pixels", endpoint="infer") >= 2
    assert sample("bnfold_requests_in_flight", endpoint="infer") == 0


def test_openapi_documents_every_endpoint_with_examples(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    expected = {
        ("get", "/v2"),
        ("get", "/v2/health/live"),
        ("get", "/v2/health/ready"),
        ("get", "/v2/models/{model_name}"),
        ("get", "/v2/models/{model_name}/versions/{model_version}"),
        ("get", "/v2/models/{model_name}/ready"),
        ("get", "/v2/models/{model_name}/versions/{model_version}/ready"),
        ("get", "/v2/models/{model_name}/config"),
        ("get", "/v2/models/{model_name}/versions/{model_version}/config"),
        ("post", "/v2/models/{model_name}/infer"),
        ("post", "/v2/models/{model_name}/versions/{model_version}/infer"),
        ("post", "/v2/models/{model_name}/compare"),
        ("post", "/v2/models/{model_name}/versions/{model_version}/compare"),
        ("post", "/v2/repository/index"),
        ("post", "/v2/repository/models/{model_name}/load"),
        ("post", "/v2/repository/models/{model_name}/unload"),
        ("get", "/metrics"),
    }
    documented = {(method, path) for path, item in schema["paths"].items() for method in item}
    assert expected <= documented
    for method, path in expected:
        assert schema["paths"][path][method].get("summary"), (method, path)
    infer = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    body = infer["requestBody"]["content"]
    assert body["application/json"]["examples"]["json"]["value"]["inputs"][0]["name"] == "input"
    assert "application/octet-stream" in body
    assert {"400", "404", "413", "422", "503"} <= set(infer["responses"])
    components = schema["components"]["schemas"]
    for name in ("InferenceRequest", "InferenceResponse", "CompareRequest", "CompareResponse"):
        assert name in components
    ref = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert ref in components
    for name in (
        "InferenceResponse",
        "CompareResponse",
        "ModelMetadataResponse",
        "RepositoryModel",
    ):
        assert components[name]["examples"], name
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "model",
    [
        ServerMetadataResponse,
        ModelMetadataResponse,
        ModelConfigResponse,
        InferenceResponse,
        CompareResponse,
        RepositoryModel,
    ],
)
def test_documented_examples_are_valid(model: type) -> None:
    [example] = model.model_json_schema()["examples"]
    model.model_validate(example)


def test_a_client_leaving_mid_body_is_no_server_error(
    service: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A body cut short by the client's disconnect was logged as an internal error with a
    traceback (and counted as a 500): any client could fill the log that way."""
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as raw:
            raw.sendall(
                b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs"'
            )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and httpx.get(f"{service.url}/metrics").status_code != 200:
        time.sleep(0.05)
    time.sleep(0.2)
    assert not [record for record in caplog.records if "internal error" in record.getMessage()]
    metrics = httpx.get(f"{service.url}/metrics").text
    assert not re.search(r'bnfold_requests_total\{[^}]*code="500"', metrics)
