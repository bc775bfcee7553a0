"""The dynamic batcher over real HTTP: merged runs give every caller exactly its own answer.

Each response is checked against onnxruntime run by the test itself on that
caller's input alone (a session of its own on the package's model.onnx), so a
row or an output handed to the wrong caller, a batch across versions, or a
merge of inputs that do not line up shows as a wrong number. The servers wait
long for company (20 ms, or a second for the overflow test) so that concurrent
requests are merged whatever the machine's load; the metrics then show that
they were. No timing is asserted.

Packages: the service test packages (tests/service_packages.py) plus
* `widths`: `x` FP32 [-1, -1] -> ReduceSum(axis 1) * 2 -> `total` [-1, 1]: requests
  of different widths cannot share a run;
* `lookup`: `index` INT64 [-1] -> Gather(table [10, 4]) -> `row` [-1, 4]: an index
  outside 0..9 passes every manifest check and fails in onnxruntime;
* `fixed`: the test MLP with its batch axis pinned to 2 rows (no dynamic axis);
* `unbatched`: the test MLP whose manifest says `"batching": {"max_batch_size": 0}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.package_format import DATATYPE_OF_DTYPE, DATATYPES, BatchingFields, ManifestTensor
from bnfold.service.batch_policy import BatchPolicy, resolve_policy
from bnfold.service.settings import Settings

from service_packages import (
    MLP_IN,
    MLP_SEEDS,
    _model,
    lookup_table,
    mlp_models,
    mlp_weights,
    write_dtypes,
    write_lookup,
    write_mlp,
    write_package,
    write_pixels,
)
from service_server import RunningServer, running_server

FLOAT32_EPS = float(np.finfo(np.float32).eps)
FIXED_ROWS = 2
MERGE_DELAY_US = 20_000


# ---------------------------------------------------------------- packages


def write_widths(repository: Path) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1),
            helper.make_node("Mul", ["sum", "two"], ["total"]),
        ],
        "widths",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
        ],
    )
    return write_package(repository, "widths", 1, _model(graph))


def _pin_batch(model: onnx.ModelProto, rows: int) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param == "batch":
            dims[0].dim_value = rows
    return model


def write_fixed(repository: Path) -> Path:
    eval_model, train_model = mlp_models(mlp_weights(seed=5))
    pinned = [_pin_batch(model, FIXED_ROWS) for model in (eval_model, train_model)]
    return write_package(repository, "fixed", 1, *pinned)


def write_unbatched(repository: Path) -> Path:
    package = write_mlp(repository, "unbatched", 1, seed=6)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["batching"] = {"max_batch_size": 0}
    (package / "manifest.json").write_text(json.dumps(manifest))
    return package


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching") / "repository"
    for version, seed in MLP_SEEDS.items():
        write_mlp(root, "mlp", version, seed)
    write_pixels(root)
    write_dtypes(root)
    write_widths(root)
    write_lookup(root)
    write_fixed(root)
    write_unbatched(root)
    # the operator's file wins over the server's defaults for every version of mlp
    (root / "mlp" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 12, "max_queue_delay_us": MERGE_DELAY_US}})
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        repository=repository,
        device="cpu",
        max_batch_size=64,
        max_queue_delay_us=MERGE_DELAY_US,
        concurrent_runs=2,
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def reference(repository: Path) -> dict[str, ort.InferenceSession]:
    """The test's own sessions on every model.onnx, default options, one request at a time."""
    return {
        f"{path.parent.name}/{path.name}": ort.InferenceSession(
            str(path / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        for path in repository.glob("*/[0-9]*")
    }


# ---------------------------------------------------------------- the wire


def v2_body(
    inputs: dict[str, np.ndarray], outputs: list[str] | None, binary: bool
) -> tuple[bytes, dict[str, str]]:
    """A V2 request: JSON tensors, or binary tensors (inputs and requested outputs)."""
    tensors = []
    for name, array in inputs.items():
        tensor = {
            "name": name,
            "shape": list(array.shape),
            "datatype": DATATYPE_OF_DTYPE[array.dtype],
        }
        if binary:
            tensor["parameters"] = {"binary_data_size": array.nbytes}
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    header: dict = {"inputs": tensors}
    if outputs is not None:
        header["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary}} for name in outputs
        ]
    json_header = orjson.dumps(header)
    if not binary:
        return json_header, {"Content-Type": "application/json"}
    raw = b"".join(np.ascontiguousarray(array).tobytes() for array in inputs.values())
    return json_header + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(json_header)),
    }


def v2_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    """Every output of a 200 response, in response order, as arrays of its datatype."""
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    header = orjson.loads(response.content if length is None else response.content[: int(length)])
    offset = 0 if length is None else int(length)
    outputs = {}
    for output in header["outputs"]:
        dtype = DATATYPES[output["datatype"]]
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            array = np.asarray(output["data"], dtype=dtype)
        else:
            array = np.frombuffer(response.content[offset : offset + size], dtype=dtype)
            offset += size
        outputs[output["name"]] = array.reshape(output["shape"])
    return outputs


def assert_matches(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same names in the same order; integers and booleans exact; floats within 32 ulps of
    the output's scale. A merged run may take another onnxruntime kernel than a run of
    one row (MLAS blocks a GEMM by its row count), which changes float32 rounding and
    nothing else; another caller's row or another version's weights are off by > 1e-2."""
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if want.dtype.kind == "f":
            scale = max(1.0, float(np.abs(want.astype(np.float64)).max()))
            eps = float(np.finfo(want.dtype).eps)
            np.testing.assert_allclose(got, want, rtol=0, atol=32 * eps * scale, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics, 0 when the series does not exist yet."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------- mixed concurrent traffic


def random_request(
    rng: np.random.Generator,
) -> tuple[str, str, dict[str, np.ndarray], list[str] | None]:
    """(model, version, inputs, requested outputs) for one random request."""
    rows = int(rng.integers(1, 6))
    kind = rng.choice(["mlp1", "mlp2", "pixels", "dtypes", "widths"])
    if kind in ("mlp1", "mlp2"):
        inputs = {"input": rng.normal(size=(rows, MLP_IN)).astype(np.float32)}
        return "mlp", kind[-1], inputs, None
    if kind == "pixels":
        return "pixels", "1", {"image": rng.normal(size=(rows, 2, 3, 3)).astype(np.float32)}, None
    if kind == "widths":
        width = int(rng.choice([3, 5]))
        return "widths", "1", {"x": rng.normal(size=(rows, width)).astype(np.float32)}, None
    inputs = {
        "a": rng.normal(size=(rows, 3)),
        "b": rng.integers(-100, 100, size=(rows, 3)).astype(np.int32),
        "c": rng.random((rows, 3)) < 0.5,
        "d": rng.normal(size=(rows, 3)).astype(np.float16),
    }
    names = ["sum", "mask", "half", "wide"]
    chosen = [str(name) for name in rng.permutation(names)[: int(rng.integers(1, 5))]]
    return "dtypes", "1", inputs, chosen


def test_concurrent_mixed_requests_each_get_their_own_rows_and_outputs(
    server: RunningServer, reference: dict[str, ort.InferenceSession]
) -> None:
    rng = np.random.default_rng(20261123)
    requests = [random_request(rng) for _ in range(160)]
    binary_flags = rng.random(len(requests)) < 0.5

    def send(index: int) -> httpx.Response:
        model, version, inputs, outputs = requests[index]
        body, headers = v2_body(inputs, outputs, bool(binary_flags[index]))
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post(
                f"/v2/models/{model}/versions/{version}/infer", content=body, headers=headers
            )

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(send, range(len(requests))))

    for (model, version, inputs, outputs), response in zip(requests, responses, strict=True):
        session = reference[f"{model}/{version}"]
        names = outputs or [output.name for output in session.get_outputs()]
        expected = dict(zip(names, session.run(names, inputs), strict=True))
        assert_matches(v2_outputs(response), expected)

    for model in ("mlp", "dtypes", "pixels"):
        runs = metric(server.url, "bnfold_run_requests_count", model=model)
        merged_requests = metric(server.url, "bnfold_run_requests_sum", model=model)
        assert 0 < runs < merged_requests, f"{model}: no run merged two requests"


def test_a_merged_run_respects_max_batch_size_and_big_requests_run_alone(
    server: RunningServer, reference: dict[str, ort.InferenceSession]
) -> None:
    """mlp's config.json caps merged runs at 12 rows: 21 rows of small requests need at
    least two runs, and the 20-row request runs as it is, the only run above 16 rows."""
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(rows, MLP_IN)).astype(np.float32) for rows in [20, 5, 5, 5, 5, 1]]

    def runs() -> tuple[float, float]:
        count = metric(server.url, "bnfold_run_batch_size_count", model="mlp")
        up_to_16 = metric(server.url, "bnfold_run_batch_size_bucket", model="mlp", le="16.0")
        return count, count - up_to_16

    def send(batch: np.ndarray) -> httpx.Response:
        body, headers = v2_body({"input": batch}, None, binary=True)
        return httpx.post(
            f"{server.url}/v2/models/mlp/versions/1/infer",
            content=body,
            headers=headers,
            timeout=30,
        )

    runs_before, above_16_before = runs()
    with ThreadPoolExecutor(len(batches)) as pool:
        responses = list(pool.map(send, batches))
    for batch, response in zip(batches, responses, strict=True):
        [expected] = reference["mlp/1"].run(["output"], {"input": batch})
        assert_matches(v2_outputs(response), {"output": expected})
    runs_after, above_16_after = runs()
    assert above_16_after - above_16_before == 1
    assert runs_after - runs_before >= 3


def test_an_input_onnxruntime_rejects_fails_alone(
    server: RunningServer, reference: dict[str, ort.InferenceSession]
) -> None:
    """The merged run fails on index 99; each request runs again alone, only that one fails."""
    indices = [np.array(rows, dtype=np.int64) for rows in ([1, 2], [3], [99, 0], [9, 8, 7], [4])]

    def send(index: np.ndarray) -> httpx.Response:
        body, headers = v2_body({"index": index}, None, binary=False)
        return httpx.post(
            f"{server.url}/v2/models/lookup/infer", content=body, headers=headers, timeout=30
        )

    with ThreadPoolExecutor(len(indices)) as pool:
        responses = list(pool.map(send, indices))
    table = lookup_table()
    for index, response in zip(indices, responses, strict=True):
        if 99 in index:
            assert response.status_code == 422, response.text
            assert "onnxruntime could not run lookup" in response.json()["error"]
        else:
            assert_matches(v2_outputs(response), {"row": table[index]})


# ---------------------------------------------------------------- batching off


def test_batching_is_off_for_a_fixed_batch_model(
    server: RunningServer, reference: dict[str, ort.InferenceSession]
) -> None:
    metadata = httpx.get(f"{server.url}/v2/models/fixed").json()
    batching = metadata["parameters"]["batching"]
    assert batching["enabled"] is False
    assert batching["disabled_reason"] == "input 'input' has no dynamic batch axis (shape [2, 8])"
    assert "dynamic_batching" not in httpx.get(f"{server.url}/v2/models/fixed/config").json()

    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(FIXED_ROWS, MLP_IN)).astype(np.float32) for _ in range(12)]

    def send(batch: np.ndarray) -> httpx.Response:
        body, headers = v2_body({"input": batch}, None, binary=True)
        return httpx.post(
            f"{server.url}/v2/models/fixed/infer", content=body, headers=headers, timeout=30
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, batches))
    for batch, response in zip(batches, responses, strict=True):
        [expected] = reference["fixed/1"].run(["output"], {"input": batch})
        assert_matches(v2_outputs(response), {"output": expected})
    runs = metric(server.url, "bnfold_run_requests_count", model="fixed")
    alone = metric(server.url, "bnfold_run_requests_bucket", model="fixed", le="1.0")
    assert runs == alone == len(batches)


def batching_of(server: RunningServer, name: str) -> dict:
    """The batching policy the server reports in the model's metadata parameters."""
    return httpx.get(f"{server.url}/v2/models/{name}").json()["parameters"]["batching"]


#: The queue fields of `unbatched` and `mlp`: the server's delay (mlp's config.json says the
#: same) and the default queue size.
SERVER_QUEUE = {"max_queue_delay_us": MERGE_DELAY_US, "max_queue_size": 256}


def test_a_package_can_turn_batching_off(server: RunningServer) -> None:
    assert batching_of(server, "unbatched") == {
        "enabled": False,
        "max_batch_size": 0,
        **SERVER_QUEUE,
        "disabled_reason": "max_batch_size is 0",
    }


def test_policy_sources_and_triton_config(server: RunningServer) -> None:
    """config.json (mlp) over the manifest over the server's settings (pixels)."""
    assert batching_of(server, "mlp") == {"enabled": True, "max_batch_size": 12, **SERVER_QUEUE}
    config = httpx.get(f"{server.url}/v2/models/pixels/config").json()
    assert config["max_batch_size"] == 0 and config["input"][0]["dims"] == [-1, 2, 3, 3]
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [64],
        "max_queue_delay_microseconds": MERGE_DELAY_US,
        "default_queue_policy": {"max_queue_size": 256},
    }


def _tensor(name: str, *shape: int) -> ManifestTensor:
    return ManifestTensor(name=name, datatype="FP32", shape=shape)


def test_resolve_policy_takes_each_field_from_the_first_source_that_sets_it() -> None:
    defaults = BatchPolicy(max_batch_size=32, max_queue_delay_us=100, max_queue_size=8)
    operator = BatchingFields(max_queue_delay_us=7)
    package = BatchingFields(max_batch_size=4, max_queue_delay_us=900)
    policy = resolve_policy(
        (operator, package), [_tensor("x", -1, 3)], [_tensor("y", -1)], defaults
    )
    assert policy == BatchPolicy(max_batch_size=4, max_queue_delay_us=7, max_queue_size=8)
    assert policy.batching
    off = resolve_policy((), [_tensor("x", -1, 3)], [_tensor("y")], defaults)
    assert off.disabled_reason == "output 'y' has no dynamic batch axis (shape [])"
    one = resolve_policy(
        (BatchingFields(max_batch_size=1),), [_tensor("x", -1)], [_tensor("y", -1)], defaults
    )
    assert not one.batching and one.max_queue_size == 8


def test_a_broken_config_file_makes_the_model_unavailable_with_the_reason(
    repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    write_mlp(root, "mlp", 1, seed=1)
    (root / "mlp" / "config.json").write_text('{"batching": {"max_batch_sise": 8}}')
    with running_server(Settings(repository=root, device="cpu")) as running:
        [entry] = httpx.post(f"{running.url}/v2/repository/index").json()
    assert entry["state"] == "UNAVAILABLE"
    assert entry["reason"].startswith("mlp/config.json is not a model configuration: ")
    assert "max_batch_sise" in entry["reason"]


# ---------------------------------------------------------------- a full queue


def test_a_full_queue_answers_503_with_retry_after_at_once(repository: Path) -> None:
    """max_queue_size 2 and a second's wait for company (the longest allowed): two requests
    wait in the queue, the third is refused without waiting; the two then run and answer
    correctly.

    The two must arrive within that second, or the first runs alone first, and the third
    must come before it ends, or the pair has left the queue: the senders share one
    client, ready before they start (a client each built its own TLS context and pool as
    it sent, and on a loaded CI machine the second once came too late), and a pair that
    did not wait together, or took over half the second to, is sent again."""
    settings = Settings(
        repository=repository,
        device="cpu",
        max_batch_size=64,
        max_queue_delay_us=1_000_000,
        max_queue_size=2,
    )
    rng = np.random.default_rng(11)
    batches = [rng.normal(size=(1, 2, 3, 3)).astype(np.float32) for _ in range(3)]
    with running_server(settings) as running, httpx.Client(timeout=30) as client:

        def send(batch: np.ndarray) -> httpx.Response:
            body, headers = v2_body({"image": batch}, None, binary=False)
            return client.post(
                f"{running.url}/v2/models/pixels/infer", content=body, headers=headers
            )

        with ThreadPoolExecutor(2) as pool:
            for _ in range(3):  # bounded: a pair that did not wait together is sent again
                sent = time.monotonic()  # the first cannot have arrived before this
                waiting = [pool.submit(send, batch) for batch in batches[:2]]
                while metric(running.url, "bnfold_requests_in_flight", endpoint="infer") < 2:
                    if all(future.done() for future in waiting):
                        break  # answered without ever both waiting: the premise failed
                    time.sleep(0.01)
                else:
                    if time.monotonic() - sent < 0.5:  # half the wait left for the third
                        break
                assert all(future.result().status_code == 200 for future in waiting)
            else:
                pytest.fail("the two requests never waited in the queue together")
            refused = send(batches[2])
            answered = [future.result() for future in waiting]
        rejected = metric(running.url, "bnfold_requests_total", model="pixels", code="503")

    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert "max_queue_size" in refused.json()["error"]
    assert rejected == 1
    session = ort.InferenceSession(
        str(repository / "pixels" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for batch, response in zip(batches, answered, strict=False):
        [expected] = session.run(["logits"], {"image": batch})
        assert_matches(v2_outputs(response), {"logits": expected})
