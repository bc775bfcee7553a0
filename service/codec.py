"""Inference bodies <-> numpy: V2 JSON tensors and Triton's binary tensor data extension.

A request body is either one JSON object, or (binary extension) a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw tensors, in input
order, each `parameters.binary_data_size` bytes long. Responses mirror that:
outputs asked for as `binary_data` follow the JSON header, and the response
carries the header length.

Why not pydantic here: validating `data` element by element costs more than the
inference. The JSON is parsed once by orjson, numbers become an array in one
`np.asarray` call, and binary tensors are `np.frombuffer` views of the body
(zero-copy). Element counts are checked against the declared shape before any
array is allocated, so a small body cannot ask for a huge tensor. Everything
that cannot be read is a `BadRequest` (400); whether the tensors fit the model is
the data plane's question (422).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bnfold.package_format import DATATYPE_OF_DTYPE, DATATYPES
from bnfold.service.errors import BadRequest

MAX_RANK = 32  # numpy 1.x's limit (2.x allows 64); no model input comes close
# Elements whose index and byte size numpy can still compute (8-byte items at most).
_MAX_ELEMENTS = int(np.iinfo(np.intp).max) // 8
_UNSUPPORTED_INPUT_PARAMETERS = ("shared_memory_region",)
_UNSUPPORTED_OUTPUT_PARAMETERS = ("shared_memory_region", "classification")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class DecodedRequest:
    """An inference request read into numpy; `fields` is the JSON header object itself."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    fields: dict[str, Any]
    # inputs whose values the decoder found finite (JSON numbers): `check_inputs` need
    # not look again
    finite: frozenset[str] = frozenset()

    def binary_for(self, name: str) -> bool:
        """Whether output `name` goes back as binary: its own flag, else the request default."""
        for output in self.outputs or ():
            if output.name == name:
                return output.binary
        return self.binary_output


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes
    header_length: int | None


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The `Inference-Header-Content-Length` header, checked against the body."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise BadRequest(
            f"Inference-Header-Content-Length must be an integer, got {value!r}"
        ) from None
    if not 0 <= length <= body_length:
        raise BadRequest(
            f"Inference-Header-Content-Length is {length} but the body has {body_length} bytes"
        )
    return length


def parse_json_object(raw: bytes | memoryview, what: str = "request body") -> dict[str, Any]:
    """orjson-parse `raw`, which must hold one JSON object (an empty body is `{}`)."""
    if len(raw) == 0:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in {what}: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def decode_request(body: bytes, header_length: int | None) -> DecodedRequest:
    """Read an inference request: JSON alone, or a JSON header plus binary tensors."""
    view = memoryview(body)
    json_end = len(body) if header_length is None else header_length
    fields = parse_json_object(view[:json_end], "inference request")
    binary = view[json_end:]

    request_id = fields.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _parameters(fields.get("parameters"), "request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("parameter 'binary_data_output' must be a boolean")

    raw_inputs = fields.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty array of tensors")
    inputs: dict[str, np.ndarray] = {}
    finite: list[str] = []
    offset = 0
    for position, raw_input in enumerate(raw_inputs):
        name, array, consumed = _decode_input(position, raw_input, binary, offset)
        if name in inputs:
            raise BadRequest(f"input '{name}' appears more than once")
        inputs[name] = array
        if consumed is None:  # JSON numbers (orjson refuses NaN and infinity) that fit
            finite.append(name)
        else:
            offset += consumed
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary)} bytes after the JSON header but the inputs' "
            f"binary_data_size add up to {offset}"
        )

    outputs = _decode_outputs(fields.get("outputs"), binary_output)
    return DecodedRequest(request_id, inputs, outputs, binary_output, fields, frozenset(finite))


def _parameters(value: object, owner: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'parameters' of {owner} must be a JSON object")
    return value


def _decode_input(
    position: int, raw: object, binary: memoryview, offset: int
) -> tuple[str, np.ndarray, int | None]:
    """The input's name, its array, and the binary bytes it took (None: JSON data)."""
    if not isinstance(raw, dict):
        raise BadRequest(f"inputs[{position}] must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{position}] needs a 'name' string")
    shape = _shape(name, raw.get("shape"))
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(
            f"input '{name}': unsupported datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    count = math.prod(shape)
    parameters = _parameters(raw.get("parameters"), f"input '{name}'")
    if parameters:
        for unsupported in _UNSUPPORTED_INPUT_PARAMETERS:
            if unsupported in parameters:
                raise BadRequest(f"input '{name}': parameter '{unsupported}' is not supported")

    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
        return name, _json_array(name, raw["data"], shape, datatype, count), None
    if "data" in raw:
        raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
        raise BadRequest(
            f"input '{name}': binary_data_size {size} runs past the end of the body "
            "(is the Inference-Header-Content-Length header set?)"
        )
    chunk = binary[offset : offset + size]
    return name, _binary_array(name, chunk, shape, datatype, count), size


def _shape(name: str, value: object) -> list[int]:
    """The declared shape, refused (400) when numpy could not even describe it.

    Counts are checked against the data later; what only numpy refuses is a rank
    above its limit, or a zero-size shape whose other dims overflow an index
    (`[0, 2**63]`): both would otherwise escape as a ValueError (a 500).
    """
    if not isinstance(value, list):
        raise BadRequest(f"input '{name}': 'shape' must be an array of non-negative integers")
    for dim in value:  # a loop, not all() over a generator: every input of every request
        if type(dim) is not int or dim < 0:  # JSON gives exact ints; bool is not one
            raise BadRequest(f"input '{name}': 'shape' must be an array of non-negative integers")
    return describable_shape(name, value)


def describable_shape(name: str, shape: list[int]) -> list[int]:
    """`shape` (non-negative dims) unless numpy could not describe it: a rank above its
    limit, or more elements than an index can count (400). REST and gRPC both check here."""
    if len(shape) > MAX_RANK:
        raise BadRequest(
            f"input '{name}': 'shape' has {len(shape)} dimensions; at most {MAX_RANK} are supported"
        )
    if math.prod(shape if 0 not in shape else [dim for dim in shape if dim]) > _MAX_ELEMENTS:
        raise BadRequest(f"input '{name}': shape {shape} is too large for any tensor")
    return shape


def _json_array(name: str, data: object, shape: list[int], datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input '{name}': 'data' must be an array (flat or nested, row-major)")
    nested_dims = []
    level: object = data
    while isinstance(level, list):
        nested_dims.append(len(level))
        if not level:
            break
        level = level[0]
    given = math.prod(nested_dims)
    if given != count:
        raise BadRequest(f"input '{name}' has {given} values but shape {shape} needs {count}")
    dtype = DATATYPES[datatype]
    if count == 0:
        return np.empty(shape, dtype=dtype)
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise BadRequest(f"input '{name}': 'data' is not a rectangular array of numbers") from None
    if values.shape != tuple(nested_dims):
        raise BadRequest(f"input '{name}': 'data' is not a rectangular array of numbers")
    if len(nested_dims) > 1 and nested_dims != shape:
        raise BadRequest(
            f"input '{name}': 'data' is nested as {nested_dims} but the shape is {shape}; "
            "send it flat (row-major) or nested exactly as the shape"
        )
    if dtype.kind in "iu" and values.dtype.kind not in "iu":
        return _exact_integers(name, data, datatype).reshape(shape)
    _check_values(name, values, datatype)
    return values.astype(dtype, copy=False).reshape(shape)


def _exact_integers(name: str, data: list[Any], datatype: str) -> np.ndarray:
    """Integers numpy could not type on its own (a mix beyond int64, e.g. -1 and 2**64 - 1).

    numpy turns such a mix into float64, which rounds above 2**53: convert
    each Python int exactly instead. The slow path, only for unusual data.
    """
    objects = np.array(data, dtype=object)
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in objects.flat):
        raise BadRequest(f"input '{name}': {datatype} data must be integers")
    try:
        return objects.astype(DATATYPES[datatype])
    except OverflowError:
        raise BadRequest(f"input '{name}': values outside the {datatype} range") from None


#: The largest finite value of each float datatype narrower than float64 (np.finfo is slow).
_FLOAT_MAX = {
    dtype: float(np.finfo(dtype).max) for dtype in (np.dtype(np.float16), np.dtype(np.float32))
}


def _check_values(name: str, values: np.ndarray, datatype: str) -> None:
    """JSON numbers must fit the declared datatype: no strings, no fractions in ints, no overflow."""
    target = DATATYPES[datatype]
    kind = values.dtype.kind
    if target.kind == "b":
        if kind != "b":
            raise BadRequest(f"input '{name}': BOOL data must be true/false")
        return
    if target.kind in "iu":
        if kind not in "iu":
            raise BadRequest(f"input '{name}': {datatype} data must be integers")
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise BadRequest(
                f"input '{name}': values outside the {datatype} range [{info.min}, {info.max}]"
            )
        return
    if kind not in "iuf":
        raise BadRequest(f"input '{name}': {datatype} data must be numbers")
    if target.itemsize < 8:
        # one reduction for floats (abs is exact for them; an int64 minimum's is not)
        if kind == "f":
            largest = float(np.abs(values).max())
        else:
            largest = max(float(values.max()), -float(values.min()))
        if largest > _FLOAT_MAX[target]:
            raise BadRequest(f"input '{name}': values overflow {datatype} (|x| up to {largest})")


def _binary_array(
    name: str, chunk: memoryview, shape: list[int], datatype: str, count: int
) -> np.ndarray:
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise BadRequest(
            f"input '{name}': binary_data_size is {len(chunk)} bytes but shape {shape} "
            f"of {datatype} needs {expected}"
        )
    array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise BadRequest(f"input '{name}': BOOL bytes must be 0 or 1")
    return array


def _decode_outputs(value: object, binary_default: bool) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be an array")
    if not value:  # the V2 spec: outputs not specified -> every output, with default settings
        return None
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()  # a scan of `outputs` per output was quadratic: 16k names, 4 s
    for position, raw in enumerate(value):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequest(f"outputs[{position}] must be an object with a 'name' string")
        name = raw["name"]
        parameters = _parameters(raw.get("parameters"), f"output '{name}'")
        for unsupported in _UNSUPPORTED_OUTPUT_PARAMETERS:
            if unsupported in parameters:
                raise BadRequest(f"output '{name}': parameter '{unsupported}' is not supported")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest(f"output '{name}': parameter 'binary_data' must be a boolean")
        if name in seen:
            raise BadRequest(f"output '{name}' is requested more than once")
        seen.add(name)
        outputs.append(RequestedOutput(name, binary))
    return tuple(outputs)


def tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """A V2 JSON tensor; `data` stays a flat numpy array for orjson to write natively."""
    return {
        "name": name,
        "datatype": DATATYPE_OF_DTYPE[array.dtype],
        "shape": list(array.shape),
        "data": np.ascontiguousarray(array).reshape(-1),
    }


def dumps(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_response(
    header: dict[str, Any], outputs: Sequence[tuple[str, np.ndarray, bool]]
) -> EncodedResponse:
    """`header` plus an `outputs` array; (name, array, binary) outputs in that order."""
    entries: list[dict[str, Any]] = []
    chunks: list[memoryview] = []
    for name, array, binary in outputs:
        if binary:
            contiguous = np.ascontiguousarray(array)
            entries.append(
                {
                    "name": name,
                    "datatype": DATATYPE_OF_DTYPE[array.dtype],
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": contiguous.nbytes},
                }
            )
            chunks.append(memoryview(contiguous.reshape(-1).view(np.uint8)))
        else:
            entries.append(tensor_json(name, array))
    json_header = dumps({**header, "outputs": entries})
    if not chunks:
        return EncodedResponse(json_header, None)
    return EncodedResponse(b"".join([json_header, *chunks]), len(json_header))
