"""Every package `bnfold convert` writes loads in `bnfold serve` and answers like its source.

Each case converts a small model (the torch pattern suite, the ONNX pattern
suites, and the cases the security review found unservable), then opens the
package exactly as the server's registry does (`read_package` + `load_model`
with a CPU `SessionConfig`: manifest schema, hashes, external data, the
sessions' inputs and outputs against the manifest), runs the eval session on
a batch the converter never saw and compares it with the source model's own
eval output by the converter's rule (`convert.verify.Agreement`:
|Δ| ≤ 1e-5·max(1, RMS(expected)) + 1e-4·|expected|, float32 rounding of two
different kernels; a wrong fold is off by the output's scale). The train
session must give one [C] mean and variance per manifest layer, which is what
compare reads. One case goes through a real HTTP server.

The torch references run in float64, the ONNX references in onnxruntime with
its optimizer off (so onnxruntime's own Conv+BN fusion is not the reference).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import ModelProto
from test_convert_patterns import torch_pattern_suite
from test_onnx_fold_backward import C, bn_then
from test_onnx_fold_conv import conv_bn
from test_onnx_fold_dense import gemm_bn, matmul_bn
from test_onnx_pipeline import cnn, mlp
from test_onnx_train_graph import conv_relu_bn_gemm
from torch import nn

from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.convert.verify import Agreement
from bnfold.package_format import MAX_VERSION
from bnfold.service.repository import PackageLocation, read_package
from bnfold.service.sessions import LoadedModel, SessionConfig, load_model
from bnfold.service.settings import Settings

from convert_helpers import convert_module
from onnx_helpers import (
    bn_initializers,
    bn_node,
    export,
    initializer,
    list_as_input,
    save_with_external_data,
)
from service_server import running_server

CPU = SessionConfig(providers=("CPUExecutionProvider",))
BATCH = 5
DATATYPES = {"FP32": np.float32, "FP64": np.float64}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository for every case (each its own model name), as a server would see it."""
    return tmp_path_factory.mktemp("roundtrip") / "repository"


def load_served(package: Path) -> LoadedModel:
    """The package as `bnfold serve` loads it (service/registry.py `_load_version`)."""
    location = PackageLocation(package.parent.name, int(package.name), package)
    return load_model(read_package(location), CPU)


def served_feed(model: LoadedModel, positive: frozenset[str] = frozenset()) -> dict:
    """A batch of BATCH rows (every dynamic axis BATCH) drawn apart from the converter's seeds.

    Inputs named in `positive` (variances fed as inputs) get values in [0.5, 2).
    """
    generator = np.random.default_rng(2024)
    feed = {}
    for tensor in model.inputs:
        shape = [BATCH if dim == -1 else dim for dim in tensor.shape]
        dtype = DATATYPES[tensor.datatype]
        if tensor.name in positive:
            feed[tensor.name] = generator.uniform(0.5, 2.0, shape).astype(dtype)
        else:
            feed[tensor.name] = generator.standard_normal(shape).astype(dtype)
    return feed


def assert_serves_like(model: LoadedModel, feed: dict, expected: list[np.ndarray]) -> None:
    """Eval outputs within the converter's rule; train statistics one [C] pair per layer."""
    names = [tensor.name for tensor in model.outputs]
    actual = model.eval_session.run(names, feed)
    agreement = Agreement()
    agreement.add("served eval", actual, expected)
    assert agreement.passed, agreement.failures
    statistics = [
        name for layer in model.layers for name in (layer.batch_mean_output, layer.batch_var_output)
    ]
    values = model.train_session.run(statistics, feed) if statistics else []
    channels = [layer.channels for layer in model.layers for _ in range(2)]
    assert [value.shape for value in values] == [(count,) for count in channels]


# ---- the torch pattern suite ---------------------------------------------------------


def torch_reference(module: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """The source model in eval mode, float64: the exact map the package must reproduce."""
    reference = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        result = reference(torch.from_numpy(x).double())
    outputs = result if isinstance(result, tuple) else (result,)
    return [output.numpy() for output in outputs]


@pytest.mark.parametrize(("build", "shape"), torch_pattern_suite())
def test_torch_pattern_package_is_served(
    build: Callable[[], nn.Module], shape: tuple[int, ...], repository: Path, request
) -> None:
    module = build()
    name = request.node.callspec.id
    result = convert_module(module, shape, repository, name=name)
    model = load_served(Path(result.package_path))
    feed = served_feed(model)
    assert_serves_like(model, feed, torch_reference(module, feed["input"]))


# ---- the ONNX pattern suites, and the review's cases ------------------------------------


@dataclass(frozen=True)
class OnnxCase:
    """A source graph; `positive` names inputs that carry variances (fed in [0.5, 2)).

    `source_batch`: the source's batch axis is fixed at this size (the package's
    is freed), so the reference runs the served batch in chunks of that many rows.
    """

    build: Callable[[Path], Path]
    version: int | None = None
    positive: frozenset[str] = field(default_factory=frozenset)
    source_batch: int | None = None


def saved(build: Callable[[], ModelProto]) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / "source.onnx"
        onnx.save(build(), str(path))
        return path

    return write


def exported(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> Callable[[Path], Path]:
    return lambda directory: export(factory(), directory / "source.onnx", shape)


def statistics_as_graph_inputs() -> ModelProto:
    model = conv_bn()
    for name in ("bn.mean", "bn.var"):
        list_as_input(model, name, keep_initializer=False)
    return model


def every_initializer_an_input_ir3() -> ModelProto:
    """IR 3 requires initializers among the inputs; they are constants there, and fold."""
    model = conv_bn(opset=9)
    for tensor in list(model.graph.initializer):
        list_as_input(model, tensor.name, keep_initializer=True)
    model.ir_version = 3
    return model


def external_data(directory: Path) -> Path:
    plain = export(cnn(width=16), directory / "plain.onnx", (2, 2, 6, 6))
    return save_with_external_data(plain, directory / "source.onnx")


def two_bns_into_one_conv() -> ModelProto:
    model = bn_then([], "Conv", shape=["N", C, 6, 6])
    model.graph.initializer.extend(bn_initializers("bn2", 4, seed=20))
    model.graph.node[-1].output[0] = "c"
    model.graph.node.append(bn_node("c", "Y", "bn2"))
    return model


def _pads(mode: str) -> ModelProto:
    pads = initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    return bn_then(
        [("Pad", {"mode": mode}, ["pads"])], "Conv", shape=["N", C, 6, 6], extra_inits=[pads]
    )


def _reshape_to_blocks() -> ModelProto:
    shape = initializer("shape", np.array([0, -1], np.int64))
    return bn_then(
        [("Reshape", {}, ["shape"])],
        "MatMul",
        shape=["N", C, 2, 3],
        layer_channels=C * 6,
        extra_inits=[shape],
    )


ONNX_CASES = {
    # forward into Conv/ConvTranspose (test_onnx_fold_conv.py)
    "conv-opset9": OnnxCase(saved(lambda: conv_bn(opset=9))),
    "conv-opset13": OnnxCase(saved(lambda: conv_bn(opset=13))),
    "conv-grouped-nobias": OnnxCase(saved(lambda: conv_bn(groups=2, bias=False))),
    "conv-transpose-grouped": OnnxCase(saved(lambda: conv_bn(op="ConvTranspose", groups=2))),
    "conv1d": OnnxCase(saved(lambda: conv_bn(spatial=1))),
    "conv3d": OnnxCase(saved(lambda: conv_bn(spatial=3))),
    "conv-depthwise": OnnxCase(saved(lambda: conv_bn(groups=4, in_channels=4, out_channels=8))),
    # forward into Gemm/MatMul (test_onnx_fold_dense.py)
    "gemm-trans-b0": OnnxCase(saved(lambda: gemm_bn(trans_b=0))),
    "gemm-alpha-beta": OnnxCase(saved(lambda: gemm_bn(alpha=0.5, beta=2.0))),
    "gemm-no-bias": OnnxCase(saved(lambda: gemm_bn(bias_shape=None))),
    "matmul-add": OnnxCase(saved(lambda: matmul_bn(bias_first=True))),
    "matmul-no-add": OnnxCase(saved(lambda: matmul_bn(add=False))),
    "matmul-rank3-transpose": OnnxCase(saved(lambda: matmul_bn(rank=3, transpose=True))),
    "matmul-rank3-kept": OnnxCase(saved(lambda: matmul_bn(rank=3, bn_channels=7))),
    # backward into Conv/Gemm/MatMul (test_onnx_fold_backward.py)
    "backward-conv": OnnxCase(saved(lambda: bn_then([], "Conv", shape=["N", C, 6, 6]))),
    "backward-conv-zero-pad-kept": OnnxCase(
        saved(lambda: bn_then([], "Conv", shape=["N", C, 6, 6], pads=[1, 1, 1, 1]))
    ),
    "backward-pad-edge": OnnxCase(saved(lambda: _pads("edge"))),
    "backward-pad-constant-kept": OnnxCase(saved(lambda: _pads("constant"))),
    "backward-dropout-gemm": OnnxCase(
        saved(lambda: bn_then([("Dropout", {}, []), ("Identity", {}, [])], "Gemm", shape=["N", C]))
    ),
    "backward-gemm-alpha-beta": OnnxCase(
        saved(lambda: bn_then([], "Gemm", shape=["N", C], alpha=0.5, beta=2.0, transB=1))
    ),
    "backward-matmul": OnnxCase(saved(lambda: bn_then([], "MatMul", shape=["N", C]))),
    "backward-flatten": OnnxCase(
        saved(
            lambda: bn_then(
                [("Flatten", {"axis": 1}, [])], "Gemm", shape=["N", C, 2, 3], layer_channels=C * 6
            )
        )
    ),
    "backward-reshape": OnnxCase(saved(_reshape_to_blocks)),
    "backward-rank3-transpose": OnnxCase(
        saved(
            lambda: bn_then([("Transpose", {"perm": [0, 2, 1]}, [])], "MatMul", shape=["N", C, 5])
        )
    ),
    "backward-sigmoid-kept": OnnxCase(
        saved(lambda: bn_then([("Sigmoid", {}, [])], "Gemm", shape=["N", C]))
    ),
    "backward-conv-transpose-kept": OnnxCase(
        saved(lambda: bn_then([], "ConvTranspose", shape=["N", C, 5, 5]))
    ),
    "forward-and-backward-one-conv": OnnxCase(saved(two_bns_into_one_conv)),
    "train-graph-two-bns": OnnxCase(saved(lambda: conv_relu_bn_gemm(17))),
    # torch-exported (test_onnx_pipeline.py)
    "torch-mlp": OnnxCase(exported(mlp, (4, 6))),
    "torch-cnn": OnnxCase(exported(cnn, (2, 2, 6, 6))),
    "torch-mlp-pinned-batch": OnnxCase(
        lambda directory: export(mlp(), directory / "source.onnx", (1, 6), dynamic=False),
        source_batch=1,
    ),
    # the review's cases
    "statistics-as-graph-inputs": OnnxCase(
        saved(statistics_as_graph_inputs), positive=frozenset({"bn.var"})
    ),
    "scale-as-graph-input": OnnxCase(
        saved(lambda: list_as_input(conv_bn(), "bn.scale", keep_initializer=False))
    ),
    "overridable-bn-parameters": OnnxCase(
        saved(lambda: list_as_input(conv_bn(), "bn.var", keep_initializer=True))
    ),
    "overridable-conv-weight": OnnxCase(
        saved(lambda: list_as_input(conv_bn(), "W", keep_initializer=True))
    ),
    "ir3-initializers-as-inputs": OnnxCase(saved(every_initializer_an_input_ir3)),
    "largest-version": OnnxCase(saved(lambda: gemm_bn()), version=MAX_VERSION),
    "external-data": OnnxCase(external_data),
}


def onnx_reference(source: Path, feed: dict, source_batch: int | None) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    if source_batch is None:
        return session.run(None, feed)
    chunks = [
        session.run(
            None, {name: value[start : start + source_batch] for name, value in feed.items()}
        )
        for start in range(0, BATCH, source_batch)
    ]
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


@pytest.mark.parametrize("case_id", list(ONNX_CASES))
def test_onnx_package_is_served(case_id: str, repository: Path, tmp_path: Path) -> None:
    case = ONNX_CASES[case_id]
    source = case.build(tmp_path)
    result = convert_onnx_file(
        source, repository=repository, name=case_id, version=case.version, sample=None
    )
    model = load_served(Path(result.package_path))
    feed = served_feed(model, case.positive)
    assert_serves_like(model, feed, onnx_reference(source, feed, case.source_batch))


# ---- through HTTP ---------------------------------------------------------------------


def test_largest_version_is_served_over_http(tmp_path: Path) -> None:
    """`bnfold serve` on a repository with version 2**63 - 1 and an overridable initializer."""
    repository = tmp_path / "repository"
    module = mlp()
    source = export(module, tmp_path / "mlp.onnx", (4, 6))
    convert_onnx_file(source, repository=repository, name="mlp", version=MAX_VERSION, sample=None)
    overridable = tmp_path / "overridable.onnx"
    onnx.save(list_as_input(conv_bn(), "W", keep_initializer=True), str(overridable))
    convert_onnx_file(overridable, repository=repository, name="conv", version=None, sample=None)
    x = np.random.default_rng(3).standard_normal((3, 6)).astype(np.float32)
    request = {
        "inputs": [
            {"name": "input", "shape": [3, 6], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    settings = Settings(repository=repository, device="cpu")
    with (
        running_server(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        index = client.post("/v2/repository/index", json={}).json()
        assert {(entry["name"], entry["version"], entry["state"]) for entry in index} == {
            ("mlp", str(MAX_VERSION), "READY"),
            ("conv", "1", "READY"),
        }
        response = client.post("/v2/models/mlp/infer", json=request)
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["model_version"] == str(MAX_VERSION)
    (output,) = body["outputs"]
    actual = np.asarray(output["data"], np.float32).reshape(output["shape"])
    agreement = Agreement()
    agreement.add("served over HTTP", [actual], torch_reference(module, x))
    assert agreement.passed, agreement.failures
