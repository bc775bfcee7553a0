"""The codec on its own: V2 JSON tensors and Triton's binary tensor data, both directions.

Responses are parsed back with tritonclient's own `InferResult`, so the binary
layout is checked against the real client, not against our reading of the spec.
"""

from __future__ import annotations

import gzip

import numpy as np
import orjson
import pytest
from tritonclient.http import InferResult

from bnfold.service.codec import (
    decode_request,
    encode_response,
    parse_header_length,
    parse_json_object,
)
from bnfold.service.errors import BadRequest


def _json_body(*inputs: dict, **fields: object) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **fields})


def _binary_body(header: dict, *arrays: np.ndarray) -> tuple[bytes, int]:
    json_header = orjson.dumps(header)
    return json_header + b"".join(array.tobytes() for array in arrays), len(json_header)


def test_flat_and_nested_json_give_the_same_row_major_array() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for data in (values.reshape(-1).tolist(), values.tolist()):
        decoded = decode_request(
            _json_body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": data}), None
        )
        array = decoded.inputs["x"]
        assert array.dtype == np.float32 and array.shape == (2, 3)
        np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP64", [0.1, 2.0], np.array([0.1, 2.0], dtype=np.float64)),
        ("FP16", [0.5, 1024], np.array([0.5, 1024], dtype=np.float16)),
        ("INT8", [-128, 127], np.array([-128, 127], dtype=np.int8)),
        ("UINT8", [0, 255], np.array([0, 255], dtype=np.uint8)),
        ("INT64", [-(2**63), 2**63 - 1], np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
        ("UINT64", [0, 2**64 - 1], np.array([0, 2**64 - 1], dtype=np.uint64)),
        ("BOOL", [True, False], np.array([True, False])),
    ],
)
def test_json_datatypes(datatype: str, data: list, expected: np.ndarray) -> None:
    body = _json_body({"name": "x", "shape": [2], "datatype": datatype, "data": data})
    array = decode_request(body, None).inputs["x"]
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3]}, "3 values"),
        ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}, "rectangular"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["1", "2"]}, "must be numbers"),
        ({"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}, "must be integers"),
        ({"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}, "INT8 range"),
        ({"name": "x", "shape": [1], "datatype": "FP16", "data": [1e6]}, "overflow FP16"),
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}, "true/false"),
        ({"name": "x", "shape": [2], "datatype": "FOO", "data": [1, 0]}, "unsupported datatype"),
        ({"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}, "unsupported"),
        ({"name": "x", "shape": [-1], "datatype": "FP32", "data": []}, "non-negative"),
        ({"name": "x", "shape": [1], "datatype": "FP32", "data": 3.0}, "must be an array"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "neither 'data'"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, "'name'"),
    ],
)
def test_unreadable_tensors_are_bad_requests(tensor: dict, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(_json_body(tensor), None)


def test_element_count_is_checked_before_allocating() -> None:
    """A 10^12-element shape with one value must fail on the count, not on memory."""
    body = _json_body({"name": "x", "shape": [10**6, 10**6], "datatype": "FP32", "data": [1.0]})
    with pytest.raises(BadRequest, match="1 values but shape"):
        decode_request(body, None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "'inputs' must be a non-empty array"),
        (b'{"inputs": [], "id": 3}', "'id' must be a string"),
        (b'{"inputs": [1]}', "inputs\\[0\\] must be a JSON object"),
    ],
)
def test_malformed_requests(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(body, None)


def test_duplicate_inputs_and_outputs_are_refused() -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    with pytest.raises(BadRequest, match="more than once"):
        decode_request(_json_body(tensor, tensor), None)
    with pytest.raises(BadRequest, match="more than once"):
        decode_request(_json_body(tensor, outputs=[{"name": "y"}, {"name": "y"}]), None)


def test_unsupported_extensions_are_named() -> None:
    shared = {
        "name": "x",
        "shape": [1],
        "datatype": "FP32",
        "parameters": {"shared_memory_region": "r"},
    }
    with pytest.raises(BadRequest, match="shared_memory_region"):
        decode_request(_json_body(shared), None)
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    classify = [{"name": "y", "parameters": {"classification": 3}}]
    with pytest.raises(BadRequest, match="classification"):
        decode_request(_json_body(tensor, outputs=classify), None)


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_binary_inputs_are_zero_copy_views_of_the_body(padding: int) -> None:
    """Any JSON header length works, even one leaving the floats unaligned."""
    first = np.arange(12, dtype=np.float32).reshape(3, 4)
    second = np.array([[1, -2], [3, -4]], dtype=np.int64)
    header = {
        "id": "r" * padding,
        "inputs": [
            {
                "name": "a",
                "shape": [3, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 48},
            },
            {
                "name": "b",
                "shape": [2, 2],
                "datatype": "INT64",
                "parameters": {"binary_data_size": 32},
            },
        ],
    }
    body, header_length = _binary_body(header, first, second)
    decoded = decode_request(body, header_length)
    np.testing.assert_array_equal(decoded.inputs["a"], first)
    np.testing.assert_array_equal(decoded.inputs["b"], second)
    body_array = np.frombuffer(body, dtype=np.uint8)
    assert np.shares_memory(decoded.inputs["a"], body_array)
    assert np.shares_memory(decoded.inputs["b"], body_array)


def test_json_and_binary_inputs_mix() -> None:
    binary = np.ones((2, 2), dtype=np.float64)
    header = {
        "inputs": [
            {"name": "j", "shape": [2], "datatype": "INT32", "data": [7, 8]},
            {
                "name": "b",
                "shape": [2, 2],
                "datatype": "FP64",
                "parameters": {"binary_data_size": 32},
            },
        ]
    }
    body, header_length = _binary_body(header, binary)
    decoded = decode_request(body, header_length)
    np.testing.assert_array_equal(decoded.inputs["j"], [7, 8])
    np.testing.assert_array_equal(decoded.inputs["b"], binary)


def test_json_inputs_are_marked_finite_and_binary_inputs_are_not() -> None:
    """`DecodedRequest.finite`: the inputs `check_inputs` need not scan for NaN or
    infinity. JSON numbers qualify (orjson refuses NaN, Infinity and 1e400; an FP32
    overflow is a 400 here); binary bytes can hold anything."""
    binary = np.array([np.nan, np.inf], dtype=np.float32)
    header = {
        "inputs": [
            {"name": "j", "shape": [2], "datatype": "FP32", "data": [1.5, -3e38]},
            {"name": "b", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        ]
    }
    body, header_length = _binary_body(header, binary)
    decoded = decode_request(body, header_length)
    assert decoded.finite == frozenset({"j"})
    assert np.isfinite(decoded.inputs["j"]).all()
    for text in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        body = b'{"inputs": [{"name": "j", "shape": [1], "datatype": "FP64", "data": [%s]}]}'
        with pytest.raises(BadRequest, match="malformed JSON"):
            decode_request(body % text, None)
    overflow = b'{"inputs": [{"name": "j", "shape": [1], "datatype": "FP32", "data": [1e39]}]}'
    with pytest.raises(BadRequest, match="values overflow FP32"):
        decode_request(overflow, None)


@pytest.mark.parametrize(
    ("sizes", "extra", "message"),
    [
        ([40], b"", "needs 48"),
        ([48], b"\0" * 4, "add up to 48"),
        ([96], b"", "runs past the end"),
        ([-1], b"", "non-negative integer"),
    ],
)
def test_binary_sizes_must_match(sizes: list[int], extra: bytes, message: str) -> None:
    array = np.zeros((3, 4), dtype=np.float32)
    header = {
        "inputs": [
            {
                "name": "a",
                "shape": [3, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": sizes[0]},
            }
        ]
    }
    body, header_length = _binary_body(header, array)
    with pytest.raises(BadRequest, match=message):
        decode_request(body[: header_length + min(48, max(sizes[0], 0))] + extra, header_length)


def test_binary_data_without_the_header_length_is_refused() -> None:
    header = {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
        ]
    }
    body, _ = _binary_body(header, np.zeros(1, dtype=np.float32))
    with pytest.raises(BadRequest):
        decode_request(body, None)


def test_binary_bool_bytes_must_be_zero_or_one() -> None:
    header = {
        "inputs": [
            {"name": "c", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}
        ]
    }
    body, header_length = _binary_body(header, np.array([1, 2], dtype=np.uint8))
    with pytest.raises(BadRequest, match="0 or 1"):
        decode_request(body, header_length)


def test_header_length_is_validated() -> None:
    assert parse_header_length(None, 10) is None
    assert parse_header_length("10", 10) == 10
    for bad in ("x", "11", "-1"):
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
            parse_header_length(bad, 10)


def test_empty_body_is_an_empty_object_for_the_repository_endpoints() -> None:
    assert parse_json_object(b"") == {}
    with pytest.raises(BadRequest):
        parse_json_object(gzip.compress(b"{}"))


def test_output_binary_flags_follow_the_request_then_the_output() -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    decoded = decode_request(
        _json_body(
            tensor,
            parameters={"binary_data_output": True},
            outputs=[{"name": "json", "parameters": {"binary_data": False}}, {"name": "default"}],
        ),
        None,
    )
    assert decoded.binary_for("json") is False
    assert decoded.binary_for("default") is True
    assert decode_request(_json_body(tensor), None).binary_for("anything") is False


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.float16, np.int8, np.int64, np.uint16, np.bool_]
)
def test_encoded_responses_read_back_with_tritonclient(dtype: type) -> None:
    rng = np.random.default_rng(0)
    binary = (rng.normal(size=(3, 5)) * 10).astype(dtype)
    as_json = (rng.normal(size=(2, 2)) * 10).astype(dtype)
    empty = np.zeros((0, 4), dtype=dtype)
    encoded = encode_response(
        {"model_name": "m", "model_version": "1", "id": "abc"},
        [("binary", binary, True), ("json", as_json, False), ("empty", empty, True)],
    )
    assert encoded.header_length is not None
    result = InferResult.from_response_body(encoded.body, header_length=encoded.header_length)
    np.testing.assert_array_equal(result.as_numpy("binary"), binary)
    np.testing.assert_array_equal(result.as_numpy("json"), as_json)
    assert result.as_numpy("empty").shape == (0, 4)
    assert result.get_response()["id"] == "abc"


def test_json_only_responses_have_no_header_length() -> None:
    encoded = encode_response(
        {"model_name": "m", "model_version": "1"}, [("y", np.array([1.5], np.float32), False)]
    )
    assert encoded.header_length is None
    assert orjson.loads(encoded.body)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1], "data": [1.5]}
    ]
