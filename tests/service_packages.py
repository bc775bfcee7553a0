"""Small, valid model packages built with `onnx.helper`, for the service tests.

The converter needs torch; the service must not. These packages follow
docs/package-format.md exactly (model.onnx, train.onnx with per-BN batch
statistics, manifest.json with sha256 hashes), so the service tests run on the
serving install alone and in well under a second per package.

Packages:

* `mlp` (versions 1 and 2): `input` [-1, 8] -> Gemm -> BN(16, folded) -> Relu
  -> Gemm -> `output` [-1, 4]. Version 2 has other weights. BatchNorm1d-like:
  `input_rank` 2, so a batch of one has no statistics.
* `pixels`: `image` [-1, 2, 3, 3] -> BN(2, kept as BatchNormalization) ->
  Flatten -> Gemm -> `logits` [-1, 3]. A BatchNorm2d-like layer (`input_rank`
  4): a batch of one still has 9 values per channel.
* `dtypes`: no BatchNorm; inputs FP64, INT32, BOOL and FP16, outputs of the
  same families, for the datatype paths of the codec.
* `broken_hash`, `missing_file`: an `mlp` whose manifest disagrees with its
  files, for the repository's isolation of broken packages.

`write_mlp(..., calibration=True)` and `write_pixels(..., calibration=True)` write
schema-2 packages instead: the same two graphs plus calibration.onnx (the
unfolded eval graph with `<layer>.running_mean/var` as overridable inputs and
`<layer>.input_mean/var/count` outputs: the drift monitor's graph). The
`build_test_repository` packages stay schema 1.

The weights come from a seeded generator; `mlp_reference` recomputes both modes
in numpy so tests can check the server's numbers independently of onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.package_format import (
    CALIBRATION_GRAPH,
    CALIBRATION_SCHEMA,
    input_stat_output_names,
    running_stat_input_names,
)

OPSET = 17
IR_VERSION = 8
BN_EPS = 1e-5
MLP_IN, MLP_HIDDEN, MLP_OUT = 8, 16, 4
PIXEL_CHANNELS, PIXEL_SIDE, PIXEL_CLASSES = 2, 3, 3


@dataclass(frozen=True)
class MLPWeights:
    """The unfolded MLP: Gemm(w1, b1) -> BN(gamma, beta, running stats) -> Relu -> Gemm(w2, b2)."""

    w1: np.ndarray
    b1: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


def mlp_weights(seed: int) -> MLPWeights:
    """Weights whose running statistics match a standard-normal input batch.

    For x ~ N(0, I), h = x @ w1 + b1 has mean b1 and variance sum(w1**2, axis=0)
    per channel, so a large N(0, 1) batch has small drift and a shifted or
    scaled one has large drift: what the compare tests measure.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0.0, 0.5, (MLP_IN, MLP_HIDDEN)).astype(np.float32)
    b1 = rng.normal(0.0, 0.1, MLP_HIDDEN).astype(np.float32)
    return MLPWeights(
        w1=w1,
        b1=b1,
        gamma=rng.uniform(0.5, 1.5, MLP_HIDDEN).astype(np.float32),
        beta=rng.normal(0.0, 0.1, MLP_HIDDEN).astype(np.float32),
        running_mean=b1.copy(),
        running_var=(w1.astype(np.float64) ** 2).sum(axis=0).astype(np.float32),
        w2=rng.normal(0.0, 0.5, (MLP_HIDDEN, MLP_OUT)).astype(np.float32),
        b2=rng.normal(0.0, 0.1, MLP_OUT).astype(np.float32),
    )


def mlp_reference(weights: MLPWeights, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Both modes in float64 numpy: eval output, train output, batch mean and biased var."""
    x = batch.astype(np.float64)
    hidden = x @ weights.w1 + weights.b1
    batch_mean = hidden.mean(axis=0)
    batch_var = ((hidden - batch_mean) ** 2).mean(axis=0)

    def head(normalised: np.ndarray) -> np.ndarray:
        activated = np.maximum(normalised * weights.gamma + weights.beta, 0.0)
        return activated @ weights.w2 + weights.b2

    return {
        "eval": head((hidden - weights.running_mean) / np.sqrt(weights.running_var + BN_EPS)),
        "train": head((hidden - batch_mean) / np.sqrt(batch_var + BN_EPS)),
        "batch_mean": batch_mean,
        "batch_var": batch_var,
    }


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _batch_norm_train_nodes(
    layer: str, source: str, target: str, axes: list[int], channel_shape: list[int]
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """BatchNorm with batch statistics from standard ops, exposing `<layer>.batch_mean/var`.

    mean = ReduceMean(x, axes); var = ReduceMean((x - mean)^2, axes) (biased, as torch);
    y = (x - mean) / sqrt(var + eps) * gamma + beta. The [C] statistics are
    reshaped to `channel_shape` to broadcast against x.
    """
    nodes = [
        helper.make_node("ReduceMean", [source], [f"{layer}.batch_mean"], axes=axes, keepdims=0),
        helper.make_node("Reshape", [f"{layer}.batch_mean", f"{layer}.shape"], [f"{layer}.m"]),
        helper.make_node("Sub", [source, f"{layer}.m"], [f"{layer}.centred"]),
        helper.make_node("Mul", [f"{layer}.centred", f"{layer}.centred"], [f"{layer}.sq"]),
        helper.make_node(
            "ReduceMean", [f"{layer}.sq"], [f"{layer}.batch_var"], axes=axes, keepdims=0
        ),
        helper.make_node("Reshape", [f"{layer}.batch_var", f"{layer}.shape"], [f"{layer}.v"]),
        helper.make_node("Add", [f"{layer}.v", f"{layer}.eps"], [f"{layer}.v_eps"]),
        helper.make_node("Sqrt", [f"{layer}.v_eps"], [f"{layer}.std"]),
        helper.make_node("Div", [f"{layer}.centred", f"{layer}.std"], [f"{layer}.normed"]),
        helper.make_node("Mul", [f"{layer}.normed", f"{layer}.gamma"], [f"{layer}.scaled"]),
        helper.make_node("Add", [f"{layer}.scaled", f"{layer}.beta"], [target]),
    ]
    initialisers = [
        _init(f"{layer}.shape", np.array(channel_shape, dtype=np.int64)),
        _init(f"{layer}.eps", np.array(BN_EPS, dtype=np.float32)),
    ]
    return nodes, initialisers


def _input_stat_nodes(
    layer: str, source: str, axes: list[int], channel_shape: list[int]
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """calibration.onnx's taps on a BN's input: `<layer>.input_mean`, `.input_var` (biased)
    over `axes`, and `.input_count` = values per channel (size / channels, int64 scalar)."""
    mean, var, count = input_stat_output_names(layer)
    tap = f"{layer}.tap"
    nodes = [
        helper.make_node("ReduceMean", [source], [mean], axes=axes, keepdims=0),
        helper.make_node("Reshape", [mean, f"{tap}.shape"], [f"{tap}.m"]),
        helper.make_node("Sub", [source, f"{tap}.m"], [f"{tap}.centred"]),
        helper.make_node("Mul", [f"{tap}.centred", f"{tap}.centred"], [f"{tap}.sq"]),
        helper.make_node("ReduceMean", [f"{tap}.sq"], [var], axes=axes, keepdims=0),
        helper.make_node("Size", [source], [f"{tap}.size"]),
        helper.make_node("Div", [f"{tap}.size", f"{tap}.channels"], [count]),
    ]
    channels = int(np.prod(channel_shape))
    initialisers = [
        _init(f"{tap}.shape", np.array(channel_shape, dtype=np.int64)),
        # a scalar: `_init`'s ascontiguousarray would make it [1]
        numpy_helper.from_array(np.array(channels, dtype=np.int64), f"{tap}.channels"),
    ]
    return nodes, initialisers


def _calibration_io(
    layer: str, channels: int
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """(the overridable running-statistics inputs, the input-statistics outputs) of a BN."""
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [channels])
        for name in running_stat_input_names(layer)
    ]
    mean, var, count = input_stat_output_names(layer)
    outputs = [
        helper.make_tensor_value_info(mean, TensorProto.FLOAT, [channels]),
        helper.make_tensor_value_info(var, TensorProto.FLOAT, [channels]),
        helper.make_tensor_value_info(count, TensorProto.INT64, []),
    ]
    return inputs, outputs


def _running_stat_initialisers(
    layer: str, running_mean: np.ndarray, running_var: np.ndarray
) -> list[TensorProto]:
    mean_name, var_name = running_stat_input_names(layer)
    return [
        _init(mean_name, running_mean.astype(np.float32)),
        _init(var_name, running_var.astype(np.float32)),
    ]


def _stat_outputs(layer: str, channels: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info(f"{layer}.batch_mean", TensorProto.FLOAT, [channels]),
        helper.make_tensor_value_info(f"{layer}.batch_var", TensorProto.FLOAT, [channels]),
    ]


def mlp_models(weights: MLPWeights) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(model.onnx with the BN folded into the first Gemm, train.onnx with batch statistics)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", MLP_IN])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", MLP_OUT])
    scale = weights.gamma / np.sqrt(weights.running_var + BN_EPS)
    folded_w1 = (weights.w1 * scale).astype(np.float32)
    folded_b1 = ((weights.b1 - weights.running_mean) * scale + weights.beta).astype(np.float32)
    head = [
        helper.make_node("Relu", ["bn"], ["act"]),
        helper.make_node("Gemm", ["act", "w2", "b2"], ["output"]),
    ]
    head_init = [_init("w2", weights.w2), _init("b2", weights.b2)]
    eval_graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1", "b1"], ["bn"]), *head],
        "mlp_eval",
        [x],
        [y],
        [_init("w1", folded_w1), _init("b1", folded_b1), *head_init],
    )
    bn_nodes, bn_init = _batch_norm_train_nodes("bn1", "hidden", "bn", [0], [1, MLP_HIDDEN])
    train_graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden"]), *bn_nodes, *head],
        "mlp_train",
        [x],
        [y, *_stat_outputs("bn1", MLP_HIDDEN)],
        [
            _init("w1", weights.w1),
            _init("b1", weights.b1),
            _init("bn1.gamma", weights.gamma.reshape(1, -1)),
            _init("bn1.beta", weights.beta.reshape(1, -1)),
            *bn_init,
            *head_init,
        ],
    )
    return _model(eval_graph), _model(train_graph)


def mlp_calibration_model(weights: MLPWeights) -> onnx.ModelProto:
    """calibration.onnx of the MLP: Gemm -> BatchNormalization("bn1", running statistics
    from overridable inputs) -> Relu -> Gemm, with taps on the BN's input (the hidden
    pre-activation x @ w1 + b1)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", MLP_IN])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", MLP_OUT])
    running_mean, running_var = running_stat_input_names("bn1")
    stat_inputs, stat_outputs = _calibration_io("bn1", MLP_HIDDEN)
    taps, tap_init = _input_stat_nodes("bn1", "hidden", [0], [1, MLP_HIDDEN])
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden"]),
            helper.make_node(
                "BatchNormalization",
                ["hidden", "bn1.gamma", "bn1.beta", running_mean, running_var],
                ["bn"],
                epsilon=BN_EPS,
            ),
            helper.make_node("Relu", ["bn"], ["act"]),
            helper.make_node("Gemm", ["act", "w2", "b2"], ["output"]),
            *taps,
        ],
        "mlp_calibration",
        [x, *stat_inputs],
        [y, *stat_outputs],
        [
            _init("w1", weights.w1),
            _init("b1", weights.b1),
            _init("bn1.gamma", weights.gamma),
            _init("bn1.beta", weights.beta),
            *_running_stat_initialisers("bn1", weights.running_mean, weights.running_var),
            _init("w2", weights.w2),
            _init("b2", weights.b2),
            *tap_init,
        ],
    )
    return _model(graph)


@dataclass(frozen=True)
class PixelsWeights:
    """The pixels model: BN(gamma, beta, running stats) -> Flatten -> Gemm(weight, bias)."""

    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray


def pixels_weights(seed: int) -> PixelsWeights:
    rng = np.random.default_rng(seed)
    c, side, classes = PIXEL_CHANNELS, PIXEL_SIDE, PIXEL_CLASSES
    return PixelsWeights(
        gamma=rng.uniform(0.5, 1.5, c).astype(np.float32),
        beta=rng.normal(0.0, 0.1, c).astype(np.float32),
        running_mean=np.zeros(c, dtype=np.float32),
        running_var=np.ones(c, dtype=np.float32),
        weight=rng.normal(0.0, 0.5, (c * side * side, classes)).astype(np.float32),
        bias=rng.normal(0.0, 0.1, classes).astype(np.float32),
    )


def _pixels_io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto, list[onnx.NodeProto]]:
    """(the image input, the logits output, the head after the BN's output `bn`)."""
    c, side, classes = PIXEL_CHANNELS, PIXEL_SIDE, PIXEL_CLASSES
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", c, side, side])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    head = [
        helper.make_node("Flatten", ["bn"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
    ]
    return x, y, head


def pixels_models(seed: int) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, list[float]]]:
    """A kept BatchNormalization on an image-like input; returns the BN's running statistics."""
    weights = pixels_weights(seed)
    c = PIXEL_CHANNELS
    gamma, beta = weights.gamma, weights.beta
    running_mean, running_var = weights.running_mean, weights.running_var
    weight, bias = weights.weight, weights.bias
    x, y, head = _pixels_io()
    head_init = [_init("weight", weight), _init("bias", bias)]
    eval_graph = helper.make_graph(
        [
            helper.make_node(
                "BatchNormalization",
                ["image", "gamma", "beta", "running_mean", "running_var"],
                ["bn"],
                epsilon=BN_EPS,
            ),
            *head,
        ],
        "pixels_eval",
        [x],
        [y],
        [
            _init("gamma", gamma),
            _init("beta", beta),
            _init("running_mean", running_mean),
            _init("running_var", running_var),
            *head_init,
        ],
    )
    bn_nodes, bn_init = _batch_norm_train_nodes("bn", "image", "bn", [0, 2, 3], [1, c, 1, 1])
    train_graph = helper.make_graph(
        [*bn_nodes, *head],
        "pixels_train",
        [x],
        [y, *_stat_outputs("bn", c)],
        [
            _init("bn.gamma", gamma.reshape(1, c, 1, 1)),
            _init("bn.beta", beta.reshape(1, c, 1, 1)),
            *bn_init,
            *head_init,
        ],
    )
    stats = {"running_mean": running_mean.tolist(), "running_var": running_var.tolist()}
    return _model(eval_graph), _model(train_graph), stats


def pixels_calibration_model(seed: int) -> onnx.ModelProto:
    """calibration.onnx of the pixels model: its BN ("bn") on the image itself, tapped over
    the batch and both spatial axes (9 values per channel and sample)."""
    weights = pixels_weights(seed)
    c = PIXEL_CHANNELS
    x, y, head = _pixels_io()
    running_mean, running_var = running_stat_input_names("bn")
    stat_inputs, stat_outputs = _calibration_io("bn", c)
    taps, tap_init = _input_stat_nodes("bn", "image", [0, 2, 3], [1, c, 1, 1])
    graph = helper.make_graph(
        [
            helper.make_node(
                "BatchNormalization",
                ["image", "gamma", "beta", running_mean, running_var],
                ["bn"],
                epsilon=BN_EPS,
            ),
            *head,
            *taps,
        ],
        "pixels_calibration",
        [x, *stat_inputs],
        [y, *stat_outputs],
        [
            _init("gamma", weights.gamma),
            _init("beta", weights.beta),
            *_running_stat_initialisers("bn", weights.running_mean, weights.running_var),
            _init("weight", weights.weight),
            _init("bias", weights.bias),
            *tap_init,
        ],
    )
    return _model(graph)


def dtypes_model() -> onnx.ModelProto:
    """No BatchNorm: sum = a + b + c + d (as FP64), mask = not c, half = 2 d, wide = b (INT64)."""
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.DOUBLE, ["batch", 3]),
        helper.make_tensor_value_info("b", TensorProto.INT32, ["batch", 3]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, ["batch", 3]),
        helper.make_tensor_value_info("d", TensorProto.FLOAT16, ["batch", 3]),
    ]
    outputs = [
        helper.make_tensor_value_info("sum", TensorProto.DOUBLE, ["batch", 3]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 3]),
        helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", 3]),
        helper.make_tensor_value_info("wide", TensorProto.INT64, ["batch", 3]),
    ]
    nodes = [
        helper.make_node("Cast", ["b"], ["b64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["c"], ["c64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["d"], ["d64"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["a", "b64"], ["ab"]),
        helper.make_node("Add", ["ab", "c64"], ["abc"]),
        helper.make_node("Add", ["abc", "d64"], ["sum"]),
        helper.make_node("Not", ["c"], ["mask"]),
        helper.make_node("Add", ["d", "d"], ["half"]),
        helper.make_node("Cast", ["b"], ["wide"], to=TensorProto.INT64),
    ]
    return _model(helper.make_graph(nodes, "dtypes", inputs, outputs))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: The V2 datatype of each ONNX element type the test packages use.
_DATATYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
}


def _manifest_tensors(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, object]]:
    """The manifest's inputs or outputs for these graph values; a symbolic axis is -1."""
    return [
        {
            "name": value.name,
            "datatype": _DATATYPES[value.type.tensor_type.elem_type],
            "shape": [
                -1 if dim.dim_param else dim.dim_value for dim in value.type.tensor_type.shape.dim
            ],
        }
        for value in values
    ]


def write_package(
    repository: Path,
    name: str,
    version: int,
    eval_model: onnx.ModelProto,
    train_model: onnx.ModelProto | None = None,
    *,
    layers: Sequence[dict[str, object]] = (),
    calibration_model: onnx.ModelProto | None = None,
) -> Path:
    """Write REPO/NAME/VERSION with the two graphs and a manifest per docs/package-format.md.

    The manifest declares the eval graph's inputs and outputs. Without a train graph (a
    package without BatchNorm layers) the eval graph is train.onnx too. With a
    calibration graph the package is schema 2 (calibration.onnx listed and hashed),
    else schema 1.
    """
    package = repository / name / str(version)
    package.mkdir(parents=True)
    onnx.save(eval_model, package / "model.onnx")
    onnx.save(eval_model if train_model is None else train_model, package / "train.onnx")
    files = ["model.onnx", "train.onnx"]
    if calibration_model is not None:
        onnx.save(calibration_model, package / CALIBRATION_GRAPH)
        files.append(CALIBRATION_GRAPH)
    manifest = {
        "schema_version": 1 if calibration_model is None else CALIBRATION_SCHEMA,
        "name": name,
        "version": version,
        "created": "2026-11-23T18:00:00+00:00",
        "source": {"kind": "onnx", "ref": "tests/service_packages.py", "sha256": "0" * 64},
        "tool_versions": {"bnfold": "0.1.0", "onnx": onnx.__version__, "opset": OPSET},
        "inputs": _manifest_tensors(eval_model.graph.input),
        "outputs": _manifest_tensors(eval_model.graph.output),
        "batchnorm": {
            "total": len(layers),
            "folded": [],
            "kept": [],
            "layers": list(layers),
        },
        "verification": {"passed": True},
        "files": {file_name: _sha256(package / file_name) for file_name in files},
    }
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return package


def _layer(
    name: str, channels: int, stats: dict[str, list[float]], input_rank: int
) -> dict[str, object]:
    return {
        "name": name,
        "channels": channels,
        "eps": BN_EPS,
        "channel_axis": 1,
        "input_rank": input_rank,
        "running_mean": stats["running_mean"],
        "running_var": stats["running_var"],
        "batch_mean_output": f"{name}.batch_mean",
        "batch_var_output": f"{name}.batch_var",
    }


def write_mlp(
    repository: Path, name: str, version: int, seed: int, *, calibration: bool = False
) -> Path:
    """The MLP package; `calibration`: schema 2, with calibration.onnx."""
    weights = mlp_weights(seed)
    eval_model, train_model = mlp_models(weights)
    stats = {
        "running_mean": weights.running_mean.tolist(),
        "running_var": weights.running_var.tolist(),
    }
    layer = _layer("bn1", MLP_HIDDEN, stats, input_rank=2)
    return write_package(
        repository,
        name,
        version,
        eval_model,
        train_model,
        layers=[layer],
        calibration_model=mlp_calibration_model(weights) if calibration else None,
    )


PIXELS_SEED = 7


def write_pixels(
    repository: Path, name: str = "pixels", version: int = 1, *, calibration: bool = False
) -> Path:
    """The pixels package; `calibration`: schema 2, with calibration.onnx."""
    eval_model, train_model, stats = pixels_models(seed=PIXELS_SEED)
    layer = _layer("bn", PIXEL_CHANNELS, stats, input_rank=4)
    return write_package(
        repository,
        name,
        version,
        eval_model,
        train_model,
        layers=[layer],
        calibration_model=pixels_calibration_model(PIXELS_SEED) if calibration else None,
    )


def write_dtypes(repository: Path, name: str = "dtypes", version: int = 1) -> Path:
    return write_package(repository, name, version, dtypes_model())


MLP_SEEDS = {1: 1, 2: 2}


def build_test_repository(repository: Path) -> Path:
    """Every package above, the two broken ones included; returns `repository`."""
    for version, seed in MLP_SEEDS.items():
        write_mlp(repository, "mlp", version, seed)
    write_pixels(repository)
    write_dtypes(repository)
    broken = write_mlp(repository, "broken_hash", 1, seed=3)
    with (broken / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    missing = write_mlp(repository, "missing_file", 1, seed=4)
    (missing / "train.onnx").unlink()
    (repository / ".mlp.3.tmp-1-abc").mkdir()
    return repository


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


#: The `lookup` package: a Gather from a fixed table, so every row of an answer names the
#: index it came from (batching tests check rows land with their request).
LOOKUP_ROWS, LOOKUP_WIDTH = 10, 4


def lookup_table() -> np.ndarray:
    return np.arange(LOOKUP_ROWS * LOOKUP_WIDTH, dtype=np.float32).reshape(LOOKUP_ROWS, -1)


def write_lookup(repository: Path, name: str = "lookup", version: int = 1) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["row"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["batch", LOOKUP_WIDTH])],
        [numpy_helper.from_array(lookup_table(), "table")],
    )
    return write_package(repository, name, version, _model(graph))
