"""ModelInfer tensors <-> numpy: `raw_input_contents` / `raw_output_contents`, typed `contents`.

The gRPC counterpart of the REST codec (`codec`), with the same datatypes
(`bnfold.package_format.DATATYPES`) and the same division of labour: whatever
cannot be read is a `BadRequest` (INVALID_ARGUMENT) here; whether the tensors
fit the model is the data plane's question.

An input's values come either as raw little-endian bytes (`raw_input_contents`,
one entry per input, in input order: for every input or none, as Triton
requires) or typed in its `contents`, in the field the protocol gives its
datatype (`int_contents` carries INT8, INT16 and INT32, `uint_contents` the
unsigned ones up to 32 bits; FP16 has no typed field and must come raw). Raw
tensors become `np.frombuffer` views of the message (no copy); typed ones are
copied once. Element counts are checked against the declared shape before any
array is made, so a small message cannot ask for a huge tensor.

Outputs always go back raw (Triton does the same over gRPC: tritonclient's
`as_numpy` reads either form), so output parameters such as `binary_data`,
which only mean something to the HTTP binary extension, are accepted and
ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from tritonclient.grpc import service_pb2

from bnfold.package_format import DATATYPE_OF_DTYPE, DATATYPES
from bnfold.service.codec import describable_shape
from bnfold.service.errors import BadRequest

# The typed contents field of each datatype (grpc_service.proto, InferTensorContents).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# What each contents field holds on the wire (and in protobuf's memory).
_FIELD_DTYPES: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_UNSUPPORTED_INPUT_PARAMETERS = ("shared_memory_region",)
_UNSUPPORTED_OUTPUT_PARAMETERS = ("shared_memory_region", "classification")


def decode_cost(request: service_pb2.ModelInferRequest) -> int:
    """Estimated peak bytes of `decode_inputs(request)`, the message itself included.

    Raw tensors are views of the message and cost nothing more. Typed values
    are held by protobuf at their field's width (a varint of 1 byte on the wire
    is 8 in memory) and copied once into the array.
    """
    cost = request.ByteSize()
    for tensor in request.inputs:
        field = CONTENTS_FIELDS.get(tensor.datatype)
        if field is not None:
            values = len(getattr(tensor.contents, field))
            cost += values * (_FIELD_DTYPES[field].itemsize + DATATYPES[tensor.datatype].itemsize)
    return cost


def decode_inputs(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors by name; raw or typed, never both."""
    if not request.inputs:
        raise BadRequest("'inputs' must hold at least one tensor")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "send every input raw (one entry each, in input order) or none"
        )
    inputs: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise BadRequest(f"inputs[{position}] needs a name")
        if name in inputs:
            raise BadRequest(f"input '{name}' appears more than once")
        for unsupported in _UNSUPPORTED_INPUT_PARAMETERS:
            if unsupported in tensor.parameters:
                raise BadRequest(f"input '{name}': parameter '{unsupported}' is not supported")
        datatype = tensor.datatype
        if datatype not in DATATYPES:
            raise BadRequest(
                f"input '{name}': unsupported datatype {datatype!r}; use one of "
                f"{', '.join(DATATYPES)}"
            )
        shape = _shape(name, tensor.shape)
        if raw:
            if tensor.contents.ListFields():
                raise BadRequest(
                    f"input '{name}' has typed contents beside raw_input_contents: use one or "
                    "the other for all inputs"
                )
            inputs[name] = _raw_array(name, raw[position], shape, datatype)
        else:
            inputs[name] = _typed_array(name, tensor.contents, shape, datatype)
    return inputs


def _shape(name: str, dims: Sequence[int]) -> list[int]:
    shape = list(dims)
    if any(dim < 0 for dim in shape):
        raise BadRequest(f"input '{name}': shape {shape} has a negative dimension")
    return describable_shape(name, shape)


def _raw_array(name: str, raw: bytes, shape: list[int], datatype: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input '{name}': raw_input_contents has {len(raw)} bytes but shape {shape} "
            f"of {datatype} needs {expected}"
        )
    # the protocol's raw tensors are little-endian; astype is a no-op where numpy's are too
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise BadRequest(f"input '{name}': BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def _typed_array(
    name: str, contents: service_pb2.InferTensorContents, shape: list[int], datatype: str
) -> np.ndarray:
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise BadRequest(
            f"input '{name}': {datatype} has no typed contents in the protocol; send it in "
            "raw_input_contents"
        )
    others = [
        descriptor.name for descriptor, _ in contents.ListFields() if descriptor.name != field
    ]
    if others:
        raise BadRequest(f"input '{name}' is {datatype}: its values go in {field}, not {others[0]}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(
            f"input '{name}' has {len(values)} values in {field} but shape {shape} needs {count}"
        )
    wire = np.fromiter(values, dtype=_FIELD_DTYPES[field], count=count)
    target = DATATYPES[datatype]
    if target.kind in "iu" and target.itemsize < wire.itemsize and count:
        info = np.iinfo(target)
        if wire.min() < info.min or wire.max() > info.max:
            raise BadRequest(
                f"input '{name}': values outside the {datatype} range [{info.min}, {info.max}]"
            )
    return wire.astype(target, copy=False).reshape(shape)


def requested_outputs(request: service_pb2.ModelInferRequest) -> list[str] | None:
    """The outputs asked for, in order; None (none named) is every output."""
    names: list[str] = []
    seen: set[str] = set()
    for position, output in enumerate(request.outputs):
        name = output.name
        if not name:
            raise BadRequest(f"outputs[{position}] needs a name")
        for unsupported in _UNSUPPORTED_OUTPUT_PARAMETERS:
            if unsupported in output.parameters:
                raise BadRequest(f"output '{name}': parameter '{unsupported}' is not supported")
        if name in seen:
            raise BadRequest(f"output '{name}' is requested more than once")
        seen.add(name)
        names.append(name)
    return names or None


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    output_names: Sequence[str],
    arrays: Sequence[np.ndarray],
) -> service_pb2.ModelInferResponse:
    """The ModelInferResponse: every output in `raw_output_contents`, little-endian."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, array in zip(output_names, arrays, strict=True):
        response.outputs.add(
            name=name, datatype=DATATYPE_OF_DTYPE[array.dtype], shape=list(array.shape)
        )
        little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        response.raw_output_contents.append(little_endian.tobytes())
    return response
