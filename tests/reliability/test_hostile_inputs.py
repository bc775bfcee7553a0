"""Hostile requests: each one a 4xx with a message that says what is wrong, never a 5xx.

Malformed and deeply nested JSON, wrong datatypes, shapes that do not fit,
element counts and binary lengths that lie, negative and huge dimensions, NaN
and infinity, non-UTF-8 bytes, model names that try to walk out of the
repository. A claim in a request (a shape, a binary_data_size) is checked
against the bytes actually received before anything is allocated: the
server's peak memory is measured while it is sent a stream of such claims.
A hypothesis fuzzer mutates valid requests field by field: every answer is a
200 with the right numbers or a 4xx.
"""

from __future__ import annotations

import gzip
import math
import time

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.service.protocol import INFERENCE_HEADER, ErrorResponse

from .harness import Connection, Outcome, ServerProcess, raw_request, run_load
from .packages import HUGE_WIDTH
from service_packages import LOOKUP_ROWS, MLP_SEEDS, lookup_table, mlp_reference, mlp_weights

MLP = "/v2/models/mlp/infer"


def tensor(name: str = "input", shape: object = (2, 8), datatype: str = "FP32", **fields) -> dict:
    body: dict = {"name": name, "shape": list(shape) if isinstance(shape, tuple) else shape}
    body["datatype"] = datatype
    if "data" not in fields and "parameters" not in fields:
        body["data"] = [0.5] * math.prod(shape)  # type: ignore[arg-type]
    body.update(fields)
    return body


def binary_body(header: dict, payload: bytes) -> tuple[bytes, dict[str, str]]:
    json_header = orjson.dumps(header)
    return json_header + payload, {INFERENCE_HEADER: str(len(json_header))}


def expect_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error = ErrorResponse.model_validate(response.json()).error
    assert message in error, error


# ---------------------------------------------------------------- JSON bodies

JSON_CASES: list[tuple[str, bytes, int, str]] = [
    ("truncated JSON", b'{"inputs": [', 400, "malformed JSON in inference request"),
    ("not JSON", b"\x00\x01binary junk", 400, "malformed JSON"),
    ("a JSON array", b"[1, 2]", 400, "inference request must be a JSON object, got list"),
    ("100k nested arrays", b"[" * 100_000, 400, "depth limit exceeded"),
    ("100k nested objects", b'{"a":' * 100_000, 400, "depth limit exceeded"),
    (
        "data nested 1000 deep",
        b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":'
        + b"[" * 1000
        + b"1"
        + b"]" * 1000
        + b"}]}",
        400,
        "'data' is not a rectangular array of numbers",
    ),
    (
        "non-UTF-8 name",
        b'{"inputs":[{"name":"\xff\xfe","shape":[1,8],"datatype":"FP32","data":[0,0,0,0,0,0,0,0]}]}',
        400,
        "not valid UTF-8",
    ),
    (
        "lone surrogate id",
        b'{"id":"\\ud800","inputs":[]}',
        400,
        "surrogate",
    ),
    (
        "NaN literal",
        b'{"inputs":[{"name":"input","shape":[1],"data":[NaN]}]}',
        400,
        "malformed JSON",
    ),
    (
        "1e999 is infinity",
        b'{"inputs":[{"name":"input","shape":[1,1],"datatype":"FP32","data":[1e999]}]}',
        400,
        "number is infinity",
    ),
]


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [case[1:] for case in JSON_CASES],
    ids=[case[0] for case in JSON_CASES],
)
def test_unreadable_bodies(client: httpx.Client, content: bytes, status: int, message: str) -> None:
    for endpoint in (MLP, "/v2/models/mlp/compare"):
        expect_error(client.post(endpoint, content=content), status, message)


TENSOR_CASES: list[tuple[str, str, dict, int, str]] = [
    # wrong datatypes
    ("unknown datatype", "mlp", {"inputs": [tensor(datatype="FLOAT")]}, 400, "unsupported datatype 'FLOAT'"),
    ("FP32 for INT64", "lookup", {"inputs": [tensor("index", (2,), data=[1.0, 2.0])]}, 422, "is FP32 but the model expects INT64"),
    ("fractions as INT64", "lookup", {"inputs": [tensor("index", (2,), "INT64", data=[1.5, 2])]}, 400, "INT64 data must be integers"),
    ("strings as FP32", "mlp", {"inputs": [tensor(shape=(1, 2), data=["1", "2"])]}, 400, "FP32 data must be numbers"),
    ("booleans as FP32", "mlp", {"inputs": [tensor(shape=(1, 2), data=[True, False])]}, 400, "FP32 data must be numbers"),
    ("numbers as BOOL", "dtypes", {"inputs": [tensor("c", (1, 3), "BOOL", data=[1, 0, 1])]}, 400, "BOOL data must be true/false"),
    ("INT32 overflow", "dtypes", {"inputs": [tensor("b", (1, 3), "INT32", data=[0, 0, 2**40])]}, 400, "values outside the INT32 range"),
    ("FP32 overflow", "mlp", {"inputs": [tensor(shape=(1, 8), data=[1e39] * 8)]}, 400, "values overflow FP32"),
    ("FP16 overflow", "dtypes", {"inputs": [tensor("d", (1, 3), "FP16", data=[7e4, 0, 0])]}, 400, "values overflow FP16"),
    ("objects as data", "mlp", {"inputs": [tensor(shape=(1, 2), data=[{}, {}])]}, 400, "FP32 data must be numbers"),
    # shapes that do not match the model
    ("wrong width", "mlp", {"inputs": [tensor(shape=(2, 7))]}, 422, "has shape [2, 7] but the model expects [-1, 8]"),
    ("wrong rank", "mlp", {"inputs": [tensor(shape=(16,))]}, 422, "has shape [16] but the model expects [-1, 8]"),
    ("unknown input", "mlp", {"inputs": [tensor("inputs")]}, 422, "unknown input 'inputs': mlp takes input"),
    ("input twice", "mlp", {"inputs": [tensor(), tensor()]}, 400, "input 'input' appears more than once"),
    # element counts that lie
    ("shape 10, data 9", "lookup", {"inputs": [tensor("index", (10,), "INT64", data=[1] * 9)]}, 400, "has 9 values but shape [10] needs 10"),
    ("shape 2x8, data 15", "mlp", {"inputs": [tensor(data=[0.0] * 15)]}, 400, "has 15 values but shape [2, 8] needs 16"),
    ("ragged rows", "mlp", {"inputs": [tensor(data=[[0.0] * 8, [0.0] * 7])]}, 400, "'data' is not a rectangular array"),
    ("no data at all", "mlp", {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32"}]}, 400, "has neither 'data' nor binary_data_size"),
    # negative and huge dimensions: refused from the numbers alone, nothing allocated
    ("negative dim", "mlp", {"inputs": [tensor(shape=[-1, 8], data=[0.0] * 8)]}, 400, "'shape' must be an array of non-negative integers"),
    ("fractional dim", "mlp", {"inputs": [tensor(shape=[1.5, 8], data=[0.0] * 8)]}, 400, "'shape' must be an array of non-negative integers"),
    ("10**12 claimed, 8 sent", "mlp", {"inputs": [tensor(shape=[1, 10**12], data=[0.0] * 8)]}, 400, "has 8 values but shape [1, 1000000000000] needs 1000000000000"),
    ("2**62 x 2**62 claimed", "mlp", {"inputs": [tensor(shape=[2**62, 2**62], data=[0.0])]}, 400, "is too large for any tensor"),
    ("zero rows of 2**63-1", "mlp", {"inputs": [tensor(shape=[0, 2**63 - 1], data=[])]}, 400, "is too large for any tensor"),
    ("rank 40", "mlp", {"inputs": [tensor(shape=[1] * 40, data=[0.0])]}, 400, "'shape' has 40 dimensions; at most 32"),
    ("rank 100 and empty", "mlp", {"inputs": [tensor(shape=[0] * 100, data=[])]}, 400, "'shape' has 100 dimensions"),
    ("huge model, one row", "huge", {"inputs": [tensor("x", (1, HUGE_WIDTH), data=[1.0])]}, 400, "needs 1000000000000"),
    # protocol fields of the wrong type
    ("id is a number", "mlp", {"id": 7, "inputs": [tensor()]}, 400, "'id' must be a string"),
    ("inputs empty", "mlp", {"inputs": []}, 400, "'inputs' must be a non-empty array"),
    ("output unknown", "mlp", {"inputs": [tensor()], "outputs": [{"name": "logits"}]}, 422, "unknown output 'logits'"),
    ("shared memory", "mlp", {"inputs": [tensor(parameters={"shared_memory_region": "r"})]}, 400, "'shared_memory_region' is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "body", "status", "message"),
    [case[1:] for case in TENSOR_CASES],
    ids=[case[0] for case in TENSOR_CASES],
)
def test_tensors_that_do_not_fit(
    client: httpx.Client, model: str, body: dict, status: int, message: str
) -> None:
    expect_error(client.post(f"/v2/models/{model}/infer", json=body), status, message)


def test_an_empty_batch_of_the_huge_model_is_served(client: httpx.Client) -> None:
    """A declared width of 10**12 costs nothing when the request holds no rows."""
    body = {"inputs": [tensor("x", (0, HUGE_WIDTH), data=[])]}
    response = client.post("/v2/models/huge/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [0]


# ---------------------------------------------------------------- binary bodies


def _mlp_binary(rows: np.ndarray, size: int | None = None) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": rows.nbytes if size is None else size},
            }
        ]
    }


def test_binary_lengths_that_lie(client: httpx.Client) -> None:
    rows = np.ones((2, 8), dtype=np.float32)
    content, headers = binary_body(_mlp_binary(rows), rows.tobytes())
    assert client.post(MLP, content=content, headers=headers).status_code == 200
    header_length = int(headers[INFERENCE_HEADER])
    lies: list[tuple[bytes, dict[str, str], str]] = [
        (content, {INFERENCE_HEADER: str(len(content) + 1)}, "but the body has"),
        (content, {INFERENCE_HEADER: "-1"}, "Inference-Header-Content-Length is -1"),
        (content, {INFERENCE_HEADER: "12 bytes"}, "must be an integer"),
        (content, {INFERENCE_HEADER: str(header_length - 3)}, "malformed JSON"),
        (content, {INFERENCE_HEADER: str(header_length + 5)}, "malformed JSON"),
        (content[:-1], headers, "runs past the end of the body"),
        (content + b"\0" * 4, headers, "but the inputs' binary_data_size add up to 64"),
        (*binary_body(_mlp_binary(rows, 60), rows.tobytes()[:60]), "but shape [2, 8] of FP32 needs 64"),
        (*binary_body(_mlp_binary(rows, 2**42), rows.tobytes()), "binary_data_size 4398046511104 runs past"),
        (*binary_body(_mlp_binary(rows, -64), rows.tobytes()), "must be a non-negative integer"),
        (*binary_body(_mlp_binary(rows[:, :0], 4), b"\0" * 4), "but shape [2, 0] of FP32 needs 0"),
        (content, {}, "malformed JSON"),
    ]  # fmt: skip
    for body, lie, message in lies:
        response = client.post(MLP, content=body, headers=lie)
        assert 400 <= response.status_code < 500, (lie, response.text)
        assert message in response.json()["error"], (lie, response.json())


def test_binary_claims_of_huge_tensors(client: httpx.Client) -> None:
    """A 4-TB shape with 4 bytes behind it: refused by arithmetic, not by an allocation."""
    header = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, HUGE_WIDTH],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 4},
            }
        ]
    }
    content, headers = binary_body(header, b"\0" * 4)
    response = client.post("/v2/models/huge/infer", content=content, headers=headers)
    expect_error(response, 400, "binary_data_size is 4 bytes but shape [1, 1000000000000]")


def test_bool_bytes_other_than_0_and_1(client: httpx.Client) -> None:
    inputs = [
        {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [0.0] * 3},
        {"name": "b", "shape": [1, 3], "datatype": "INT32", "data": [0] * 3},
        {"name": "c", "shape": [1, 3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
        {"name": "d", "shape": [1, 3], "datatype": "FP16", "data": [0.0] * 3},
    ]
    content, headers = binary_body({"inputs": inputs}, b"\x00\x01\x02")
    response = client.post("/v2/models/dtypes/infer", content=content, headers=headers)
    expect_error(response, 400, "BOOL bytes must be 0 or 1")


# ---------------------------------------------------------------- NaN and infinity


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("endpoint", ["infer", "compare"])
def test_nan_and_infinity_are_refused(client: httpx.Client, bad: float, endpoint: str) -> None:
    """The policy (RELIABILITY.md): floating inputs must be finite, binary or JSON, infer or compare.

    JSON has no NaN or Infinity literal (and 1e999 is refused as malformed); binary
    tensors can carry them, and get 422 with the input's name.
    """
    rows = np.zeros((4, 8), dtype=np.float32)
    rows[2, 5] = bad
    content, headers = binary_body(_mlp_binary(rows), rows.tobytes())
    response = client.post(f"/v2/models/mlp/{endpoint}", content=content, headers=headers)
    expect_error(response, 422, "input 'input' contains NaN or infinity")


def test_nan_in_fp16_and_fp64_inputs_is_refused(client: httpx.Client) -> None:
    halves = np.array([[0.0, np.inf, 1.0]], dtype=np.float16)
    inputs = [
        {"name": "a", "shape": [1, 3], "datatype": "FP64", "data": [0.0] * 3},
        {"name": "b", "shape": [1, 3], "datatype": "INT32", "data": [0] * 3},
        {"name": "c", "shape": [1, 3], "datatype": "BOOL", "data": [True] * 3},
        {"name": "d", "shape": [1, 3], "datatype": "FP16", "parameters": {"binary_data_size": 6}},
    ]
    content, headers = binary_body({"inputs": inputs}, halves.tobytes())
    response = client.post("/v2/models/dtypes/infer", content=content, headers=headers)
    expect_error(response, 422, "input 'd' contains NaN or infinity")


# ---------------------------------------------------------------- model names and paths

NAME_CASES: list[tuple[str, int, str]] = [
    ("/v2/models/../infer", 404, "unknown model '..'"),
    ("/v2/models/%2e%2e/infer", 404, "unknown model '..'"),
    ("/v2/models/%2E%2E/ready", 404, "unknown model '..'"),
    ("/v2/models/..%2f..%2fetc/infer", 404, "Not Found"),
    ("/v2/models/%2e%2e%2fmlp/infer", 404, "Not Found"),
    ("/v2/models/mlp%2f..%2fpixels", 404, "Not Found"),
    ("/v2/models/%00/infer", 404, "unknown model '\\x00'"),
    ("/v2/models/mlp%00/infer", 404, "unknown model 'mlp\\x00'"),
    ("/v2/models/mlp%00.onnx", 404, "unknown model 'mlp\\x00.onnx'"),
    ("/v2/models/..%5c..%5cetc/config", 404, "unknown model '..\\\\..\\\\etc'"),
    ("/v2/models/mlp/versions/../infer", 404, "model 'mlp' has no version '..'"),
    ("/v2/models/mlp/versions/%2e%2e/config", 404, "model 'mlp' has no version '..'"),
    ("/v2/models/mlp/versions/1%00/infer", 404, "model 'mlp' has no version '1\\x00'"),
    ("/v2/models/mlp/versions/-1/infer", 404, "model 'mlp' has no version '-1'"),
    ("/v2/models/mlp/versions/99999999999999999999999/infer", 404, "has no version"),
    ("/v2/models/.mlp.3.tmp-1-abc/infer", 404, "unknown model '.mlp.3.tmp-1-abc'"),
    ("/v2/models/%ff%fe/infer", 404, "unknown model"),
]


@pytest.mark.parametrize(
    ("target", "status", "message"), NAME_CASES, ids=[c[0] for c in NAME_CASES]
)
def test_model_names_that_walk_out(
    reliability_service, target: str, status: int, message: str
) -> None:
    """Request targets sent byte for byte; names are looked up in the table, never joined to a path."""
    method = "POST" if target.endswith("infer") else "GET"
    body = orjson.dumps({"inputs": [tensor()]}) if method == "POST" else b""
    response = raw_request(reliability_service.port, method, target, body)
    assert response.status == status, (response.status, response.body)
    assert response.headers["content-type"] == "application/json"
    assert message in orjson.loads(response.body)["error"], response.body


# ---------------------------------------------------------------- many names


def test_thousands_of_names_cost_linear_time(client: httpx.Client) -> None:
    """100k requested outputs (1.7 MB) or 50k inputs (3 MB): refused in well under a second
    each, not after the minutes a quadratic duplicate check took (9a4c6f1)."""
    row = tensor(shape=(1, 8))
    many_outputs = {"inputs": [row], "outputs": [{"name": f"o{i}"} for i in range(100_000)]}
    many_inputs = {"inputs": [tensor(f"x{i}", (0, 8), data=[]) for i in range(50_000)]}
    for body, message in [
        (many_outputs, "unknown output 'o0'"),
        (many_inputs, "unknown input 'x0'"),
    ]:
        started = time.perf_counter()
        response = client.post(MLP, content=orjson.dumps(body), timeout=5)
        expect_error(response, 422, message)
        assert time.perf_counter() - started < 2


# ---------------------------------------------------------------- after all that


def test_the_server_still_serves_correct_answers(client: httpx.Client) -> None:
    batch = np.random.default_rng(3).normal(size=(3, 8)).astype(np.float32)
    body = {"inputs": [tensor(shape=batch.shape, data=batch.tolist())]}
    response = client.post(MLP, json=body)
    assert response.status_code == 200
    reference = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["eval"]
    served = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float64).reshape(3, 4)
    # float32 against a float64 reference: two 8- and 16-term Gemms, 32 ulps of the scale
    assert (
        np.abs(served - reference).max() <= 32 * np.finfo(np.float32).eps * np.abs(reference).max()
    )


# ---------------------------------------------------------------- memory under claims

CLAIMS = 400


def test_claims_never_allocate(load_server: ServerProcess) -> None:
    """400 requests each claiming terabytes (JSON and binary): the server's peak RSS barely moves."""
    json_claim = orjson.dumps({"inputs": [tensor("x", (1, HUGE_WIDTH), data=[1.0])]})
    binary_claim, binary_headers = binary_body(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2**20, HUGE_WIDTH],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 2**62},
                }
            ]
        },
        b"\0" * 16,
    )
    gzip_claim = gzip.compress(json_claim)
    before = load_server.memory_kib()

    async def send(connection: Connection, index: int) -> Outcome:
        path = "/v2/models/huge/infer"
        if index % 3 == 0:
            return await connection.post(index, path, json_claim)
        if index % 3 == 1:
            return await connection.post(index, path, binary_claim, binary_headers)
        return await connection.post(index, path, gzip_claim, {"Content-Encoding": "gzip"})

    outcomes = run_load(load_server.port, CLAIMS, 16, send, deadline=60)
    after = load_server.memory_kib()
    assert {outcome.status for outcome in outcomes} == {400}
    growth_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(
        f"FIGURE claims: {CLAIMS} requests claiming terabytes, peak RSS "
        f"{before['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MiB"
    )
    assert growth_mib < 32, growth_mib


# ---------------------------------------------------------------- property-based fuzzing


def _valid_lookup(indices: list[int]) -> dict:
    return {
        "inputs": [{"name": "index", "shape": [len(indices)], "datatype": "INT64", "data": indices}]
    }


MUTATIONS = st.sampled_from(
    ["shape", "datatype", "data", "drop", "extra", "binary_size", "name", "nest", "none"]
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=12), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    indices=st.lists(st.integers(min_value=0, max_value=LOOKUP_ROWS - 1), min_size=0, max_size=6),
    mutation=MUTATIONS,
    junk=JUNK,
)
def test_mutated_requests_are_answered_or_refused(
    client: httpx.Client, indices: list[int], mutation: str, junk: object
) -> None:
    """One field of a valid lookup request replaced by junk: a correct 200 or a 4xx, nothing else."""
    body = _valid_lookup(indices)
    field = body["inputs"][0]
    if mutation in ("shape", "datatype", "data", "name"):
        field[mutation] = junk
    elif mutation == "drop":
        del field["data"]
    elif mutation == "extra":
        field["parameters"] = {"binary_data_size": junk}
    elif mutation == "binary_size":
        field["parameters"] = {"binary_data_size": junk}
        del field["data"]
    elif mutation == "nest":
        field["data"] = [indices, junk]
    response = client.post("/v2/models/lookup/infer", content=orjson.dumps(body))
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        output = response.json()["outputs"][0]
        served = np.asarray(output["data"], dtype=np.float32)
        if math.prod(output["shape"]) == 0:  # an empty batch, however its `data` was nested
            assert served.size == 0
        else:
            sent = np.asarray(field["data"], dtype=np.int64).reshape(-1)
            assert np.array_equal(served, lookup_table()[sent].reshape(-1))
    else:
        assert 400 <= response.status_code < 500
        ErrorResponse.model_validate(response.json())


def test_lookup_reference_is_onnxruntime(reliability_repository) -> None:
    """The fuzzer's reference (`lookup_table()[indices]`) is what onnxruntime computes."""
    session = ort.InferenceSession(
        str(reliability_repository / "lookup" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    indices = np.array([3, 0, 9], dtype=np.int64)
    assert np.array_equal(session.run(None, {"index": indices})[0], lookup_table()[indices])
