"""The real `tritonclient.http`, unchanged, against the server: every call a Triton user makes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights
from service_server import RunningServer

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def client(service: RunningServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=service.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)


def _mlp_input(batch: np.ndarray, *, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def _assert_mlp_output(result: triton.InferResult, batch: np.ndarray, version: int) -> None:
    """`output` as mlp version `version` computes it (numpy reference, float64), within
    32 float32 ulps of the output scale (see test_service_http.float32_tolerance)."""
    expected = mlp_reference(mlp_weights(MLP_SEEDS[version]), batch)["eval"]
    tolerance = 32 * FLOAT32_EPS * float(np.abs(expected).max())
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=tolerance)


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("broken_hash")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "bnfold"
    metadata = client.get_model_metadata("mlp")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert client.get_model_metadata("mlp", "1")["parameters"]["version"] == "1"
    config = client.get_model_config("mlp")
    assert config["platform"] == "onnxruntime_onnx"
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 8]}]


def test_repository_index(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    states = {(entry["name"], entry["version"]): entry["state"] for entry in index}
    assert states[("mlp", "2")] == "READY"
    assert states[("broken_hash", "1")] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True)]
)
def test_infer(
    client: triton.InferenceServerClient, batch: np.ndarray, binary_in: bool, binary_out: bool
) -> None:
    tensor = _mlp_input(batch, binary=binary_in)
    requested = [triton.InferRequestedOutput("output", binary_data=binary_out)]
    result = client.infer("mlp", [tensor], model_version="1", outputs=requested, request_id="t-1")
    response = result.get_response()
    assert (response["model_version"], response["id"]) == ("1", "t-1")
    assert ("data" in response["outputs"][0]) is not binary_out
    _assert_mlp_output(result, batch, version=1)


def test_infer_without_outputs_gets_binary_outputs_of_the_latest_version(
    client: triton.InferenceServerClient, batch: np.ndarray
) -> None:
    """tritonclient asks for `binary_data_output` when no outputs are named."""
    result = client.infer("mlp", [_mlp_input(batch)])
    assert result.get_response()["model_version"] == "2"
    assert "binary_data_size" in result.get_output("output")["parameters"]
    _assert_mlp_output(result, batch, version=2)


def test_infer_with_compressed_requests(
    client: triton.InferenceServerClient, batch: np.ndarray
) -> None:
    tensor = _mlp_input(batch)
    plain = client.infer("mlp", [tensor]).as_numpy("output")
    for algorithm in ("gzip", "deflate"):
        compressed = client.infer("mlp", [tensor], request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(compressed.as_numpy("output"), plain)


def test_all_datatypes_in_binary(client: triton.InferenceServerClient) -> None:
    arrays = {
        "a": np.array([[1.5, -2.0, 3.0]], dtype=np.float64),
        "b": np.array([[7, -8, 9]], dtype=np.int32),
        "c": np.array([[True, False, False]]),
        "d": np.array([[0.25, 4.0, -1.0]], dtype=np.float16),
    }
    datatypes = {"a": "FP64", "b": "INT32", "c": "BOOL", "d": "FP16"}
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("dtypes", inputs)
    np.testing.assert_array_equal(
        result.as_numpy("sum"),
        arrays["a"] + arrays["b"] + arrays["c"] + arrays["d"].astype(np.float64),
    )
    np.testing.assert_array_equal(result.as_numpy("mask"), ~arrays["c"])
    np.testing.assert_array_equal(result.as_numpy("half"), arrays["d"] * 2)
    np.testing.assert_array_equal(result.as_numpy("wide"), arrays["b"].astype(np.int64))


def test_errors_reach_the_client_with_their_status(
    client: triton.InferenceServerClient, batch: np.ndarray
) -> None:
    tensor = triton.InferInput("input", [6, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((6, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as shape_error:
        client.infer("mlp", [tensor])
    assert shape_error.value.status() == "422"
    assert "expects [-1, 8]" in shape_error.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException) as broken:
        client.get_model_config("broken_hash")
    assert broken.value.status() == "503"
