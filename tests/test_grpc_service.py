"""The real `tritonclient.grpc`, unchanged, against the gRPC server: what a Triton user calls.

One server (conftest `grpc_service`) answers REST and gRPC from the same data plane, so
every gRPC answer here is checked against the REST answer or computed independently:
onnxruntime run directly on the package's model.onnx, or the numpy reference of the MLP.
Nothing here changes the repository (test_grpc_admin.py loads and unloads).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service_packages import MLP_SEEDS, lookup_table, mlp_reference, mlp_weights
from service_server import RunningServer

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def client(grpc_service: RunningServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=grpc_service.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def rest(grpc_service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=grpc_service.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def stub(grpc_service: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """The protocol's own stub (tritonclient's generated code): for what tritonclient never
    sends, such as typed contents."""
    with grpc.insecure_channel(grpc_service.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def reference(repository: Path, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of onnxruntime run here, directly on the package's model.onnx."""
    session = ort.InferenceSession(
        str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def dtypes_feeds(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "a": rng.normal(size=(rows, 3)),
        "b": rng.integers(-1000, 1000, (rows, 3), dtype=np.int32),
        "c": rng.random((rows, 3)) > 0.5,
        "d": rng.normal(size=(rows, 3)).astype(np.float16),
    }


DTYPES_DATATYPES = {"a": "FP64", "b": "INT32", "c": "BOOL", "d": "FP16"}


def code_of(call: object, *args: object, **kwargs: object) -> tuple[str, str]:
    """The status a tritonclient call failed with, and its message."""
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.status(), caught.value.message()


# ---------------------------------------------------------------- health and metadata


def test_health(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "2")
    # as Triton: not ready, no error, for a broken, an unknown model or version
    assert not client.is_model_ready("broken_hash")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("mlp", "9")


def test_server_metadata_is_the_rest_one(
    client: triton.InferenceServerClient, rest: httpx.Client
) -> None:
    metadata = client.get_server_metadata()
    expected = rest.get("/v2").json()
    assert metadata.name == "bnfold" == expected["name"]
    assert metadata.version == expected["version"]
    assert list(metadata.extensions) == expected["extensions"]


@pytest.mark.parametrize(("name", "version"), [("dtypes", ""), ("mlp", "1"), ("mlp", "")])
def test_model_metadata_is_the_rest_one(
    client: triton.InferenceServerClient, rest: httpx.Client, name: str, version: str
) -> None:
    metadata = client.get_model_metadata(name, version, as_json=True)
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
    expected = rest.get(path).json()
    assert metadata["name"] == expected["name"]
    assert metadata["platform"] == expected["platform"] == "onnxruntime_onnx"
    assert metadata["versions"] == expected["versions"]
    for side in ("inputs", "outputs"):
        # protobuf's JSON writes int64 as strings: read the shapes back as integers
        got = [{**t, "shape": [int(dim) for dim in t["shape"]]} for t in metadata[side]]
        assert got == expected[side]


def test_model_config_is_the_rest_one_in_tritons_proto(
    client: triton.InferenceServerClient, rest: httpx.Client
) -> None:
    config = client.get_model_config("mlp").config
    expected = rest.get("/v2/models/mlp/config").json()
    assert (config.name, config.platform, config.backend) == (
        expected["name"],
        expected["platform"],
        expected["backend"],
    )
    assert config.max_batch_size == expected["max_batch_size"]
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [-1, 8])]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert [(t.name, list(t.dims)) for t in config.output] == [("output", [-1, 4])]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    batching = expected["dynamic_batching"]
    assert list(config.dynamic_batching.preferred_batch_size) == batching["preferred_batch_size"]
    assert (
        config.dynamic_batching.max_queue_delay_microseconds
        == batching["max_queue_delay_microseconds"]
    )
    assert (
        config.dynamic_batching.default_queue_policy.max_queue_size
        == batching["default_queue_policy"]["max_queue_size"]
    )
    assert config.parameters["execution_providers"].string_value == "CPUExecutionProvider"


def test_repository_index_is_the_rest_one(
    client: triton.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    rest: httpx.Client,
) -> None:
    indexes = {
        False: client.get_model_repository_index().models,
        # tritonclient has no `ready` flag: the protocol's stub sends it
        True: stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True)).models,
    }
    for ready, index in indexes.items():
        expected = rest.post("/v2/repository/index", json={"ready": ready}).json()
        assert [
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in index
        ] == [{**entry, "reason": entry["reason"] or ""} for entry in expected]
    states = {(m.name, m.state) for m in indexes[False]}
    assert ("broken_hash", "UNAVAILABLE") in states and ("mlp", "READY") in states
    assert all(m.state == "READY" for m in indexes[True])


# ---------------------------------------------------------------- inference


def test_infer_four_datatypes_batch_of_five_matches_onnxruntime(
    client: triton.InferenceServerClient, grpc_repository: Path
) -> None:
    feeds = dtypes_feeds(5)
    inputs = [infer_input(name, feeds[name], DTYPES_DATATYPES[name]) for name in feeds]
    result = client.infer("dtypes", inputs, request_id="req-42")
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-42", "dtypes", "1")
    expected = reference(grpc_repository, "dtypes", feeds)
    assert [output.name for output in response.outputs] == list(expected)
    for name, array in expected.items():
        served = result.as_numpy(name)
        assert served.dtype == array.dtype and served.shape == array.shape == (5, 3)
        # the same graph on the same onnxruntime, one request alone in its run: bit-equal
        np.testing.assert_array_equal(served, array)


def test_selected_outputs_come_in_the_order_asked(
    client: triton.InferenceServerClient, grpc_repository: Path
) -> None:
    feeds = dtypes_feeds(2)
    inputs = [infer_input(name, feeds[name], DTYPES_DATATYPES[name]) for name in feeds]
    asked = [triton.InferRequestedOutput("wide"), triton.InferRequestedOutput("mask")]
    result = client.infer("dtypes", inputs, outputs=asked)
    assert [output.name for output in result.get_response().outputs] == ["wide", "mask"]
    expected = reference(grpc_repository, "dtypes", feeds)
    np.testing.assert_array_equal(result.as_numpy("wide"), expected["wide"])
    np.testing.assert_array_equal(result.as_numpy("mask"), expected["mask"])
    assert result.as_numpy("sum") is None


@pytest.mark.parametrize("version", ["1", "2"])
def test_mlp_batch_matches_the_numpy_reference(
    client: triton.InferenceServerClient, version: str
) -> None:
    batch = np.random.default_rng(3).normal(size=(6, 8)).astype(np.float32)
    result = client.infer("mlp", [infer_input("input", batch, "FP32")], model_version=version)
    assert result.get_response().model_version == version
    expected = mlp_reference(mlp_weights(MLP_SEEDS[int(version)]), batch)["eval"]
    # float32 sums of 8 and 16 terms against float64: 32 ulps of the output scale
    tolerance = 32 * FLOAT32_EPS * float(np.abs(expected).max())
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=tolerance)


def test_typed_contents_are_read_like_raw_ones(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """tritonclient always sends raw tensors; other clients (KServe's) send typed ones."""
    index = np.array([3, 0, 9, 3], dtype=np.int64)
    request = service_pb2.ModelInferRequest(model_name="lookup", id="typed")
    request.inputs.add(name="index", datatype="INT64", shape=[4]).contents.int64_contents.extend(
        index.tolist()
    )
    response = stub.ModelInfer(request)
    assert response.id == "typed" and response.outputs[0].datatype == "FP32"
    rows = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(4, -1)
    np.testing.assert_array_equal(rows, lookup_table()[index])

    batch = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp", model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=[3, 8]).contents.fp32_contents.extend(
        batch.ravel().tolist()
    )
    response = stub.ModelInfer(request)
    served = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 4)
    expected = mlp_reference(mlp_weights(MLP_SEEDS[1]), batch)["eval"]
    tolerance = 32 * FLOAT32_EPS * float(np.abs(expected).max())
    np.testing.assert_allclose(served, expected, rtol=0, atol=tolerance)


def test_stream_answers_each_request_and_reports_errors_in_the_stream(
    client: triton.InferenceServerClient,
) -> None:
    answers: list[tuple[object, object]] = []
    done = threading.Event()

    def collect(result: object, error: object) -> None:
        answers.append((result, error))
        if len(answers) == 3:
            done.set()

    index = np.array([1, 2], dtype=np.int64)
    client.start_stream(callback=collect)
    try:
        client.async_stream_infer("lookup", [infer_input("index", index, "INT64")], request_id="1")
        client.async_stream_infer("nope", [infer_input("index", index, "INT64")], request_id="2")
        client.async_stream_infer(
            "lookup", [infer_input("index", index + 5, "INT64")], request_id="3"
        )
        assert done.wait(30)
    finally:
        client.stop_stream()
    (first, no_error), (_, failed), (third, no_error_either) = answers
    assert no_error is None and no_error_either is None
    assert [first.get_response().id, third.get_response().id] == ["1", "3"]
    np.testing.assert_array_equal(first.as_numpy("row"), lookup_table()[index])
    np.testing.assert_array_equal(third.as_numpy("row"), lookup_table()[index + 5])
    assert "unknown model 'nope'" in str(failed)


# ---------------------------------------------------------------- statistics and metrics


def _stats(client: triton.InferenceServerClient, name: str) -> service_pb2.ModelStatistics:
    (statistics,) = client.get_inference_statistics(name).model_stats
    return statistics


def _grpc_requests(rest: httpx.Client, model: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(rest.get("/metrics").text)
        for sample in family.samples
        if sample.name == "bnfold_requests_total"
        and sample.labels
        == {"model": model, "endpoint": "grpc_infer", "outcome": "ok", "code": "200"}
    )


def test_statistics_and_metrics_count_grpc_requests(
    client: triton.InferenceServerClient, rest: httpx.Client
) -> None:
    before, requests_before = _stats(client, "pixels"), _grpc_requests(rest, "pixels")
    images = np.random.default_rng(5).normal(size=(2, 2, 3, 3)).astype(np.float32)
    for _ in range(3):  # one after another: each runs alone
        client.infer("pixels", [infer_input("image", images, "FP32")])
    after = _stats(client, "pixels")
    assert (after.name, after.version) == ("pixels", "1")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count - before.execution_count == 3
    assert after.last_inference >= before.last_inference
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, stage).count == after.inference_stats.success.count
        assert getattr(after.inference_stats, stage).ns > 0
    batch_two = next(batch for batch in after.batch_stats if batch.batch_size == 2)
    assert batch_two.compute_infer.count >= 3
    assert _grpc_requests(rest, "pixels") - requests_before == 3
    # the REST statistics extension reads the same counters
    (rest_stats,) = rest.get("/v2/models/pixels/stats").json()["model_stats"]
    assert rest_stats["inference_count"] == after.inference_count
    assert rest_stats["inference_stats"]["success"]["count"] == after.inference_stats.success.count


def test_statistics_of_every_model_and_of_an_unknown_one(
    client: triton.InferenceServerClient,
) -> None:
    names = {stats.name for stats in client.get_inference_statistics().model_stats}
    assert {"mlp", "dtypes", "pixels", "lookup", "slow"} <= names and "broken_hash" not in names
    assert code_of(client.get_inference_statistics, "nope")[0] == "StatusCode.NOT_FOUND"


# ---------------------------------------------------------------- errors


def test_client_mistakes_get_their_codes(client: triton.InferenceServerClient) -> None:
    batch = np.zeros((2, 8), dtype=np.float32)
    good = [infer_input("input", batch, "FP32")]
    cases = {
        "unknown model": (client.infer, ("nope", good), "NOT_FOUND", "unknown model 'nope'"),
        "unknown version": (client.infer, ("mlp", good, "9"), "NOT_FOUND", "version"),
        "wrong shape": (
            client.infer,
            ("mlp", [infer_input("input", np.zeros((2, 7), np.float32), "FP32")]),
            "INVALID_ARGUMENT",
            "has shape [2, 7] but the model expects [-1, 8]",
        ),
        "wrong datatype": (
            client.infer,
            ("mlp", [infer_input("input", batch.astype(np.float64), "FP64")]),
            "INVALID_ARGUMENT",
            "is FP64 but the model expects FP32",
        ),
        "wrong input name": (
            client.infer,
            ("mlp", [infer_input("x", batch, "FP32")]),
            "INVALID_ARGUMENT",
            "unknown input 'x'",
        ),
        "not finite": (
            client.infer,
            ("mlp", [infer_input("input", np.full((1, 8), np.nan, np.float32), "FP32")]),
            "INVALID_ARGUMENT",
            "NaN or infinity",
        ),
        "unknown output": (
            client.infer,
            ("mlp", good, "", [triton.InferRequestedOutput("logits")]),
            "INVALID_ARGUMENT",
            "unknown output 'logits'",
        ),
        "broken model": (client.infer, ("broken_hash", good), "UNAVAILABLE", "sha256"),
        "unknown metadata": (client.get_model_metadata, ("nope",), "NOT_FOUND", "nope"),
        "unknown config": (client.get_model_config, ("nope",), "NOT_FOUND", "nope"),
    }
    for case, (call, args, code, message) in cases.items():
        status, text = code_of(call, *args)
        assert status == f"StatusCode.{code}", (case, status, text)
        assert message in text, (case, text)


def test_a_raw_tensor_of_the_wrong_size_is_invalid_argument(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 8])
    request.raw_input_contents.append(b"\0" * 60)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "has 60 bytes but shape [2, 8] of FP32 needs 64" in caught.value.details()


def test_admin_calls_need_the_token(client: triton.InferenceServerClient) -> None:
    status, message = code_of(client.unload_model, "mlp")
    assert status == "StatusCode.UNAUTHENTICATED" and "Bearer <token>" in message
    status, message = code_of(client.unload_model, "mlp", headers={"authorization": "Bearer wrong"})
    assert (status, message) == ("StatusCode.UNAUTHENTICATED", "wrong admin token")
    status, message = code_of(client.load_model, "mlp", headers={"authorization": "Basic x"})
    assert status == "StatusCode.UNAUTHENTICATED"
    assert client.is_model_ready("mlp")


@pytest.mark.parametrize(
    ("call", "what"),
    [
        ("get_system_shared_memory_status", "system shared memory"),
        ("get_cuda_shared_memory_status", "CUDA shared memory"),
        ("get_trace_settings", "trace extension"),
        ("get_log_settings", "logging extension"),
    ],
)
def test_what_bnfold_does_not_do_is_unimplemented_and_says_so(
    client: triton.InferenceServerClient, call: str, what: str
) -> None:
    status, message = code_of(getattr(client, call))
    assert status == "StatusCode.UNIMPLEMENTED"
    assert message.startswith("bnfold does not implement") and what in message


def test_a_named_repository_is_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="other"))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "bnfold serves one repository" in caught.value.details()


def test_a_message_that_does_not_parse_is_invalid_argument(grpc_service: RunningServer) -> None:
    """grpcio itself would answer UNKNOWN (service/grpc/handlers.py)."""
    garbage = b"\xff\xff\xff\xff"
    with grpc.insecure_channel(grpc_service.grpc_address) as channel:
        for method in ("ModelInfer", "RepositoryIndex"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                call(garbage)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"not a valid inference.{method}Request" in caught.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([garbage])))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # the server goes on serving
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
            response_deserializer=service_pb2.ServerLiveResponse.FromString,
        )
        assert live(service_pb2.ServerLiveRequest()).live


def test_an_input_onnxruntime_refuses_at_run_time_is_invalid_argument(
    client: triton.InferenceServerClient,
) -> None:
    """`lookup` gathers rows 0..9: index 99 passes every manifest check and fails in the run."""
    index = np.array([1, 99], dtype=np.int64)
    status, message = code_of(client.infer, "lookup", [infer_input("index", index, "INT64")])
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "onnxruntime could not run lookup" in message
