"""Before any load: does the server answer right? One request per model and encoding, its
output compared with onnxruntime run in this process on the same sample.

A server that answers an error, or numbers that differ, is reported with the reason and
gets no load on that model and encoding: a benchmark of a wrong answer, or of an error
path, says nothing about serving. The sample is read back from the gRPC body the load
sends (its raw tensor bytes), so the check and the load carry the same bytes.

Tolerance: the reference session opens the same model.onnx with the same options and
threads, and a check sends one sample (batch 1) to an idle server, so every server runs
the same kernels; JSON carries float32 values as exact decimals. The differences left
are a reduction order that may change with a batch shape (a server may pad or merge):
1e-5 relative and 1e-5 absolute on logits of magnitude about 1-10 leaves room for that
and for nothing else.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from serving.load import GRPC_SCHEME, MODEL_INFER, Body

RTOL = 1e-5
ATOL = 1e-5


@dataclass
class Check:
    server: str
    model: str
    encoding: str
    ok: bool
    reason: str  # what failed, or the largest difference when it passed
    max_abs_diff: float = float("nan")


def sample_of(grpc_body: Body) -> tuple[str, np.ndarray]:
    """The input name and sample inside the pre-built gRPC ModelInferRequest."""
    message = service_pb2.ModelInferRequest.FromString(grpc_body.path.read_bytes())
    [tensor] = message.inputs
    data = np.frombuffer(message.raw_input_contents[0], dtype=np.float32)
    return tensor.name, data.reshape(tuple(tensor.shape))


def reference_output(package: Path, sample: tuple[str, np.ndarray], threads: int) -> np.ndarray:
    """onnxruntime in this process, opened the way `bnfold serve` opens it."""
    from bnfold.service.sessions import SessionConfig, open_session

    config = SessionConfig(providers=("CPUExecutionProvider",), intra_op_threads=threads)
    session = open_session((package / "model.onnx").read_bytes(), {}, config)
    name, array = sample
    return session.run(None, {name: array})[0]


def _answer(url: str, body: Body) -> np.ndarray:
    """The first output of one request, decoded from whichever encoding it came in."""
    if url.startswith(GRPC_SCHEME):
        with grpc.insecure_channel(url.removeprefix(GRPC_SCHEME)) as channel:
            infer = channel.unary_unary(
                MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
            )
            answer = infer(body.path.read_bytes(), timeout=60)
        shape = tuple(answer.outputs[0].shape)
        if answer.raw_output_contents:
            return np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(shape)
        return np.array(answer.outputs[0].contents.fp32_contents, np.float32).reshape(shape)
    request = urllib.request.Request(url, data=body.path.read_bytes(), headers=body.headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        content = response.read()
        header_length = response.headers.get("Inference-Header-Content-Length")
    header = json.loads(content[: int(header_length)] if header_length else content)
    output = header["outputs"][0]
    if "data" in output:
        return np.array(output["data"], np.float32).reshape(output["shape"])
    raw = content[int(header_length) :][: output["parameters"]["binary_data_size"]]
    return np.frombuffer(raw, np.float32).reshape(output["shape"])


def check(
    server: str, model: str, encoding: str, url: str, body: Body, expected: np.ndarray
) -> Check:
    try:
        answer = _answer(url, body)
    except urllib.error.HTTPError as error:
        text = error.read()[:200].decode(errors="replace").strip()
        return Check(server, model, encoding, False, f"HTTP {error.code}: {text}")
    except grpc.RpcError as error:
        return Check(server, model, encoding, False, f"gRPC {error.code().name}: {error.details()}")
    except (OSError, ValueError, KeyError, IndexError) as error:  # refused, reset, not V2
        return Check(server, model, encoding, False, f"{type(error).__name__}: {error}")
    if answer.shape != expected.shape:
        reason = f"shape {list(answer.shape)}, expected {list(expected.shape)}"
        return Check(server, model, encoding, False, reason)
    difference = float(np.max(np.abs(answer - expected)))
    if not np.allclose(answer, expected, rtol=RTOL, atol=ATOL):
        reason = f"differs from onnxruntime by up to {difference:.3g}"
        return Check(server, model, encoding, False, reason, difference)
    return Check(server, model, encoding, True, f"max |difference| {difference:.3g}", difference)
