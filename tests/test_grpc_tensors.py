"""ModelInfer tensors <-> numpy (service/grpc/tensors.py): raw and typed contents of every
datatype the service takes, and every malformed message refused with a `BadRequest` that
names the problem. Pure functions on the protocol's own messages (tritonclient's stubs)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from bnfold.package_format import DATATYPES
from bnfold.service.errors import BadRequest
from bnfold.service.grpc.tensors import (
    CONTENTS_FIELDS,
    decode_cost,
    decode_inputs,
    encode_response,
    requested_outputs,
)

SHAPE = (3, 4)


def sample(datatype: str, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Values spanning the datatype's range (its extremes included for integers)."""
    dtype = DATATYPES[datatype]
    rng = np.random.default_rng(sum(map(ord, datatype)))
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        values.flat[0], values.flat[1] = info.min, info.max
        return values
    return rng.normal(0, 100, shape).astype(dtype)


def raw_request(**arrays: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        datatype = next(key for key, dtype in DATATYPES.items() if dtype == array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return request


def typed_request(name: str, datatype: str, shape: tuple[int, ...], field: str, values: list):
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_raw_contents_of_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    (decoded,) = decode_inputs(raw_request(x=array)).values()
    assert decoded.dtype == DATATYPES[datatype] and decoded.shape == SHAPE
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", list(CONTENTS_FIELDS))
def test_typed_contents_of_every_datatype_that_has_a_field(datatype: str) -> None:
    array = sample(datatype)
    request = typed_request("x", datatype, SHAPE, CONTENTS_FIELDS[datatype], array.ravel().tolist())
    decoded = decode_inputs(request)["x"]
    assert decoded.dtype == DATATYPES[datatype] and decoded.shape == SHAPE
    np.testing.assert_array_equal(decoded, array)


def test_several_inputs_keep_their_names_and_order() -> None:
    arrays = {"a": sample("FP64"), "b": sample("INT32"), "c": sample("BOOL"), "d": sample("FP16")}
    decoded = decode_inputs(raw_request(**arrays))
    assert list(decoded) == ["a", "b", "c", "d"]
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_an_empty_tensor_needs_no_contents() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[0, 8])
    assert decode_inputs(request)["x"].shape == (0, 8)


def refused(request: service_pb2.ModelInferRequest) -> str:
    with pytest.raises(BadRequest) as caught:
        decode_inputs(request)
    return caught.value.message


def test_malformed_requests_are_refused_naming_the_problem() -> None:
    no_inputs = service_pb2.ModelInferRequest(model_name="m")
    assert "at least one tensor" in refused(no_inputs)

    two = raw_request(a=sample("FP32"), b=sample("FP32"))
    del two.raw_input_contents[1]
    assert "raw_input_contents has 1 entries for 2 inputs" in refused(two)

    mixed = raw_request(a=sample("FP32"))
    mixed.inputs[0].contents.fp32_contents.extend([1.0])
    assert "typed contents beside raw_input_contents" in refused(mixed)

    short = raw_request(x=sample("FP32"))
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    assert "has 47 bytes but shape [3, 4] of FP32 needs 48" in refused(short)

    duplicate = raw_request(x=sample("FP32"))
    duplicate.inputs.add(name="x", datatype="FP32", shape=SHAPE)
    duplicate.raw_input_contents.append(duplicate.raw_input_contents[0])
    assert "input 'x' appears more than once" in refused(duplicate)

    unnamed = raw_request(x=sample("FP32"))
    unnamed.inputs[0].name = ""
    assert "inputs[0] needs a name" in refused(unnamed)


@pytest.mark.parametrize(
    ("datatype", "shape", "message"),
    [
        ("BYTES", [1], "unsupported datatype 'BYTES'"),
        ("FP32", [2, -1], "negative dimension"),
        ("FP32", [1] * 33, "at most 32 are supported"),
        ("FP32", [2**40, 2**40], "too large for any tensor"),
    ],
)
def test_unsupported_datatypes_and_shapes(datatype: str, shape: list[int], message: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    assert message in refused(request)


def test_typed_contents_must_fit_the_datatype() -> None:
    assert "FP16 has no typed contents" in refused(
        typed_request("x", "FP16", (1,), "fp32_contents", [1.0])
    )
    assert "its values go in int_contents, not fp32_contents" in refused(
        typed_request("x", "INT32", (1,), "fp32_contents", [1.0])
    )
    assert "has 3 values in fp32_contents but shape [2, 2] needs 4" in refused(
        typed_request("x", "FP32", (2, 2), "fp32_contents", [1.0, 2.0, 3.0])
    )
    assert "values outside the INT8 range [-128, 127]" in refused(
        typed_request("x", "INT8", (2,), "int_contents", [1, 128])
    )
    assert "values outside the UINT16 range [0, 65535]" in refused(
        typed_request("x", "UINT16", (1,), "uint_contents", [65536])
    )


def test_raw_bool_bytes_must_be_0_or_1() -> None:
    request = raw_request(x=np.array([True, False]))
    request.raw_input_contents[0] = b"\x01\x02"
    assert "BOOL bytes must be 0 or 1" in refused(request)


def test_shared_memory_is_refused_for_inputs_and_outputs() -> None:
    request = raw_request(x=sample("FP32"))
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    assert "parameter 'shared_memory_region' is not supported" in refused(request)
    asking = service_pb2.ModelInferRequest(model_name="m")
    asking.outputs.add(name="y").parameters["classification"].int64_param = 3
    with pytest.raises(BadRequest, match="parameter 'classification' is not supported"):
        requested_outputs(asking)


def test_requested_outputs_in_order_binary_data_ignored() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    assert requested_outputs(request) is None
    request.outputs.add(name="b").parameters["binary_data"].bool_param = True
    request.outputs.add(name="a")
    assert requested_outputs(request) == ["b", "a"]
    request.outputs.add(name="b")
    with pytest.raises(BadRequest, match="output 'b' is requested more than once"):
        requested_outputs(request)


def test_decode_cost_counts_typed_values_at_their_field_and_array_widths() -> None:
    raw = raw_request(x=sample("FP32"))
    assert decode_cost(raw) == raw.ByteSize()
    typed = typed_request("x", "INT8", (1000,), "int_contents", [1] * 1000)
    # 1000 int32 values held by protobuf, then 1000 int8 in the array
    assert decode_cost(typed) == typed.ByteSize() + 1000 * (4 + 1)


def test_outputs_go_back_raw_little_endian_with_the_request_id() -> None:
    arrays = [sample("FP16"), sample("BOOL"), sample("INT64")]
    response = encode_response("m", "3", "req-1", ["h", "b", "i"], arrays)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("h", "FP16", list(SHAPE)),
        ("b", "BOOL", list(SHAPE)),
        ("i", "INT64", list(SHAPE)),
    ]
    for raw, array in zip(response.raw_output_contents, arrays, strict=True):
        little = np.frombuffer(raw, dtype=array.dtype.newbyteorder("<")).reshape(SHAPE)
        np.testing.assert_array_equal(little, array)
