"""Requests with known answers: random inputs for the repository's models, each request's
expected outputs from onnxruntime run on that request's own input, and the decoding of
both response encodings.

The reference sessions open the package's model.onnx with the server's options
(full optimisation, one thread), so a response that is not bit-identical to the
reference means the server mixed rows up, not that two kernels rounded differently.
That holds because onnxruntime computes each row of these graphs independently of
the batch it runs in (test_load.py checks it), so merging requests changes no bit.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

from bnfold.package_format import DATATYPES
from bnfold.service.protocol import INFERENCE_HEADER

from .harness import Outcome
from .packages import SLOW_WIDTH
from service_packages import LOOKUP_ROWS

# model -> {input name: (trailing shape, datatype)}
INPUTS: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {
    "mlp": {"input": ((8,), "FP32")},
    "pixels": {"image": ((2, 3, 3), "FP32")},
    "dtypes": {"a": ((3,), "FP64"), "b": ((3,), "INT32"), "c": ((3,), "BOOL"), "d": ((3,), "FP16")},
    "slow": {"x": ((SLOW_WIDTH,), "FP32")},
    "lookup": {"index": ((), "INT64")},
}
HIGHEST = {"mlp": 2}


@dataclass(frozen=True)
class PlannedRequest:
    """One request: where it goes, its body and headers, and the outputs it must get back."""

    path: str
    content: bytes
    headers: dict[str, str]
    expected: dict[str, np.ndarray]


@functools.cache
def reference_session(model_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def random_inputs(model: str, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (trailing, datatype) in INPUTS[model].items():
        shape = (rows, *trailing)
        dtype = DATATYPES[datatype]
        if datatype == "BOOL":
            arrays[name] = rng.integers(0, 2, shape).astype(bool)
        elif model == "lookup":
            arrays[name] = rng.integers(0, LOOKUP_ROWS, shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[name] = rng.integers(-1000, 1000, shape).astype(dtype)
        else:
            arrays[name] = rng.normal(0.0, 1.0, shape).astype(dtype)
    return arrays


def body(
    inputs: dict[str, np.ndarray], *, binary: bool, extra: dict | None = None
) -> tuple[bytes, dict[str, str]]:
    """A V2 inference body: JSON tensors, or binary tensors asking for binary outputs."""
    if not binary:
        tensors = [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": _datatype(array),
                "data": array.reshape(-1).tolist(),
            }
            for name, array in inputs.items()
        ]
        return orjson.dumps({"inputs": tensors, **(extra or {})}), {}
    tensors = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": _datatype(array),
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, array in inputs.items()
    ]
    header = orjson.dumps(
        {"inputs": tensors, "parameters": {"binary_data_output": True}, **(extra or {})}
    )
    payload = b"".join(np.ascontiguousarray(array).tobytes() for array in inputs.values())
    return header + payload, {INFERENCE_HEADER: str(len(header))}


def _datatype(array: np.ndarray) -> str:
    return next(name for name, dtype in DATATYPES.items() if dtype == array.dtype)


def plan_request(
    repository: Path,
    model: str,
    rows: int,
    rng: np.random.Generator,
    *,
    binary: bool,
    version: int | None = None,
) -> PlannedRequest:
    inputs = random_inputs(model, rows, rng)
    served_version = version or HIGHEST.get(model, 1)
    session = reference_session(repository / model / str(served_version) / "model.onnx")
    names = [output.name for output in session.get_outputs()]
    expected = dict(zip(names, session.run(names, inputs), strict=True))
    content, headers = body(inputs, binary=binary)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return PlannedRequest(path, content, headers, expected)


def decode_outputs(content: bytes, headers: dict[str, str] | object) -> dict[str, np.ndarray]:
    """A V2 inference response's outputs as arrays, from JSON or binary tensors."""
    header_length = headers.get(INFERENCE_HEADER.lower())  # type: ignore[attr-defined]
    json_end = len(content) if header_length is None else int(header_length)
    response = orjson.loads(content[:json_end])
    outputs, offset = {}, json_end
    for output in response["outputs"]:
        dtype = DATATYPES[output["datatype"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(output["data"], dtype=dtype)
        else:
            array = np.frombuffer(content[offset : offset + size], dtype=dtype)
            offset += size
        outputs[output["name"]] = array.reshape(output["shape"])
    return outputs


def mismatches(planned: PlannedRequest, content: bytes, headers: object) -> list[str]:
    """What differs, bit for bit, between a response and the request's expected outputs."""
    outputs = decode_outputs(content, headers)
    problems = []
    for name, expected in planned.expected.items():
        got = outputs.get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif got.shape != expected.shape or got.dtype != expected.dtype:
            problems.append(f"{name}: {got.dtype}{got.shape} != {expected.dtype}{expected.shape}")
        elif not np.array_equal(got, expected):
            difference = np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()
            problems.append(f"{name}: values differ (max {difference:.3g})")
    return problems


def assert_all_exact(
    outcomes: Sequence[Outcome], count: int, planned_for: Callable[[int], PlannedRequest]
) -> None:
    """`count` outcomes, each a 200 whose outputs are bit-identical to those expected for the
    request it answers, `planned_for(outcome.index)`."""
    statuses = Counter(outcome.status for outcome in outcomes)
    assert statuses == {200: count}, (
        statuses,
        [o.error or o.body[:200] for o in outcomes if o.status != 200][:5],
    )
    wrong = {
        outcome.index: problems
        for outcome in outcomes
        if (problems := mismatches(planned_for(outcome.index), outcome.body, outcome.headers))
    }
    assert not wrong, list(wrong.items())[:5]
