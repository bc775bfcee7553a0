"""calibration.onnx (package schema 2): the unfolded eval graph with per-BN input statistics.

Every check runs the package's calibration.onnx in onnxruntime, fully
optimized as the service runs it, and compares it with references that share
nothing with how it was built:

* torch sources: the original module in eval mode, in float64, with forward
  pre-hooks on each manifest layer's BN recording the mean, the biased
  variance (over N and the spatial axes) and the count of its input; for
  overridden statistics, a copy of the module with them loaded into its BNs.
* ONNX sources: the original graph in onnxruntime with its optimizer off and
  the BN inputs computed stage by stage (conv in onnxruntime, BN and the rest
  in numpy); for overridden statistics, the original with its BN initializers
  replaced.

Tolerances: rtol 1e-4, atol 1e-5 (the converter's float32 rule, written out
here). calibration.onnx runs the unfolded network in float32; the references
run in float64, so each output and statistic carries float32 rounding of the
layers before it (~1e-6 relative on these small networks). A wrong axis list,
an unbiased variance (a factor n/(n-1), at least 1.0016 here), a missing
layer or statistics that are not the ones fed are all off by far more.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper
from test_onnx_train_graph import conv_relu_bn_gemm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.errors import UnsupportedSource
from bnfold.convert.onnx.calibration_graph import (
    build_calibration_graph,
    calibration_layers,
    source_layers,
    unfolded_source,
)
from bnfold.convert.onnx.graph import infer_tensor_info
from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.convert.repository_build import build_default_repository
from bnfold.models.registry import BUILTIN_MODELS
from bnfold.package_format import (
    CALIBRATION_GRAPH,
    SCHEMA_VERSION,
    input_stat_output_names,
    parse_manifest,
    running_stat_input_names,
    sha256_file,
)
from bnfold.service.repository import PackageLocation, read_package
from bnfold.service.sessions import SessionConfig, load_model

from convert_helpers import calibrated, convert_module
from onnx_helpers import (
    LATEST_OPSET,
    array,
    bn_initializers,
    bn_node,
    export,
    initializer,
    make_model,
)

RTOL = 1e-4
ATOL = 1e-5
DIGITS = ("digits_mlp", "digits_resnet", "digits_mobilenet", "digits_conv1d")
BATCH_SIZES = (1, 5)


def calibration_session(package: Path) -> onnxruntime.InferenceSession:
    """calibration.onnx as the service runs it: every graph optimization on."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        str(package / CALIBRATION_GRAPH), options, providers=["CPUExecutionProvider"]
    )


def layer_names(package: Path) -> list[str]:
    return [
        layer.name
        for layer in parse_manifest((package / "manifest.json").read_bytes()).batchnorm.layers
    ]


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=RTOL, atol=ATOL, err_msg=what
    )


# ---------------------------------------------------------------- the torch reference


@contextmanager
def bn_input_statistics(module: nn.Module, paths: list[str]) -> Iterator[dict[str, list]]:
    """Record (mean, biased var, count) of the input of each BN module at `paths`, per call."""
    recorded: dict[str, list] = {path: [] for path in paths}

    def hook(path: str) -> Callable:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            axes = [0, *range(2, x.dim())]
            mean = x.mean(dim=axes)
            shape = [1, -1] + [1] * (x.dim() - 2)
            var = ((x - mean.reshape(shape)) ** 2).mean(dim=axes)
            recorded[path].append((mean.numpy(), var.numpy(), x.numel() // x.shape[1]))

        return record

    handles = [module.get_submodule(path).register_forward_pre_hook(hook(path)) for path in paths]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def torch_float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().eval()


def check_torch_package(module: nn.Module, package: Path, input_shape: tuple[int, ...]) -> None:
    """Outputs and input statistics at batch 1 and 5, then outputs with overridden statistics."""
    layers = layer_names(package)
    session = calibration_session(package)
    reference = torch_float64(module)
    generator = np.random.default_rng(7)
    for batch in BATCH_SIZES:
        x = generator.standard_normal((batch, *input_shape[1:])).astype(np.float32)
        with bn_input_statistics(reference, layers) as recorded, torch.no_grad():
            expected = reference(torch.from_numpy(x).double()).numpy()
        actual = session.run(None, {"input": x})
        assert_close(actual[0], expected, f"output at batch {batch}")
        names = [output.name for output in session.get_outputs()]
        for position, layer in enumerate(layers):
            (mean, var, count) = recorded[layer][0]
            values = dict(zip(names, actual, strict=True))
            mean_name, var_name, count_name = input_stat_output_names(layer)
            assert_close(values[mean_name], mean, f"{layer} input mean at batch {batch}")
            assert_close(values[var_name], var, f"{layer} input var at batch {batch}")
            assert values[count_name].dtype == np.int64 and values[count_name].shape == ()
            assert int(values[count_name]) == count, (layer, position)
    check_torch_override(module, package, input_shape, layers)


def check_torch_override(
    module: nn.Module, package: Path, input_shape: tuple[int, ...], layers: list[str]
) -> None:
    """Fed other running statistics, calibration.onnx is the model with them in its BNs."""
    session = calibration_session(package)
    generator = np.random.default_rng(11)
    reference = torch_float64(module)
    feed: dict[str, np.ndarray] = {
        "input": generator.standard_normal((5, *input_shape[1:])).astype(np.float32)
    }
    for layer in layers:
        bn = reference.get_submodule(layer)
        assert isinstance(bn, _BatchNorm)
        channels = bn.num_features
        mean = generator.uniform(-1, 1, channels).astype(np.float32)
        var = generator.uniform(0.5, 2.0, channels).astype(np.float32)
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
        feed.update(zip(running_stat_input_names(layer), (mean, var), strict=True))
    with torch.no_grad():
        expected = reference(torch.from_numpy(feed["input"]).double()).numpy()
    default = session.run(["output"], {"input": feed["input"]})[0]
    (overridden,) = session.run(["output"], feed)
    assert_close(overridden, expected, "output with overridden running statistics")
    assert not np.allclose(default, expected, rtol=RTOL, atol=ATOL)  # the override mattered


# ---------------------------------------------------------------- torch sources


@pytest.fixture(scope="module")
def digits_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    repository = tmp_path_factory.mktemp("calibration") / "repository"
    packages = {}
    for name in DIGITS:
        spec = BUILTIN_MODELS[name]
        module = spec.load()
        result = convert_module(module, spec.input_shape, repository, name=name)
        packages[name] = (module, Path(result.package_path))
    return packages


@pytest.mark.parametrize("name", DIGITS)
def test_digits_calibration_graph_matches_torch(digits_packages, name: str) -> None:
    """Residual adds (resnet), depthwise convs (mobilenet), BN1d heads (mlp), Conv1d."""
    module, package = digits_packages[name]
    check_torch_package(module, package, BUILTIN_MODELS[name].input_shape)


@pytest.mark.parametrize("name", DIGITS)
def test_digits_calibration_graph_interface(digits_packages, name: str) -> None:
    """Inputs, outputs, BN node names and defaults exactly as the package format says."""
    _module, package = digits_packages[name]
    manifest = parse_manifest((package / "manifest.json").read_bytes())
    model = onnx.load(str(package / CALIBRATION_GRAPH))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version >= 4
    layers = manifest.batchnorm.layers
    assert layers, "every digits model has BN layers"
    stat_inputs = [name for layer in layers for name in running_stat_input_names(layer.name)]
    assert [value.name for value in model.graph.input] == ["input", *stat_inputs]
    batch_axis = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.HasField("dim_value")
    defaults = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for layer in layers:
        mean_name, var_name = running_stat_input_names(layer.name)
        assert defaults[mean_name].dtype == np.float32
        np.testing.assert_array_equal(defaults[mean_name], np.float32(layer.running_mean))
        np.testing.assert_array_equal(defaults[var_name], np.float32(layer.running_var))
    stat_outputs = [name for layer in layers for name in input_stat_output_names(layer.name)]
    assert [value.name for value in model.graph.output] == ["output", *stat_outputs]
    batchnorms = {
        node.name: node for node in model.graph.node if node.op_type == "BatchNormalization"
    }
    for layer in layers:
        assert list(batchnorms[layer.name].input[3:5]) == list(running_stat_input_names(layer.name))
    assert calibration_layers(model) == [layer.name for layer in layers]


class KeptAndUnusual(nn.Module):
    """Kept BNs (after a ReLU into a zero-padded depthwise conv; after a residual add), a
    track_running_stats=False BN (not a layer) and a BN1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.kept = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.branch = nn.BatchNorm2d(8)
        self.batch_only = nn.BatchNorm2d(8, track_running_stats=False)
        self.head_bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        z = self.branch(self.depthwise(self.kept(y)) + y)
        z = self.batch_only(z)
        pooled = z.mean(dim=(2, 3))
        return self.fc(self.head_bn(pooled))


def test_torch_model_with_kept_and_non_layer_batchnorms(tmp_path: Path) -> None:
    shape = (2, 3, 6, 6)
    module = calibrated(KeptAndUnusual(), shape)
    result = convert_module(module, shape, tmp_path / "repository")
    package = Path(result.package_path)
    assert {entry.name for entry in result.batchnorm.kept} >= {"kept", "branch", "batch_only"}
    assert layer_names(package) == ["bn", "kept", "branch", "head_bn"]
    check_torch_package(module, package, shape)


# ---------------------------------------------------------------- ONNX sources


def numpy_bn(x: np.ndarray, model: ModelProto, prefix: str, mean=None, var=None) -> np.ndarray:
    """An eval-mode BN written out from the ONNX spec (epsilon 1e-3, as `bn_node` sets)."""
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    shape = (-1,) + (1,) * (x.ndim - 2)
    mean = values[f"{prefix}.mean"] if mean is None else np.float64(mean)
    var = values[f"{prefix}.var"] if var is None else np.float64(var)
    normalised = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-3)
    return normalised * values[f"{prefix}.scale"].reshape(shape) + values[f"{prefix}.bias"].reshape(
        shape
    )


def input_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    axes = (0, *range(2, x.ndim))
    mean = x.mean(axis=axes)
    return (
        mean,
        np.square(x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))).mean(axis=axes),
        x.size // x.shape[1],
    )


def conv_relu_bn_gemm_reference(model: ModelProto, x: np.ndarray, overrides: dict | None = None):
    """conv (onnxruntime, no BN involved) -> numpy BN(a) -> ReLU -> flatten -> BN(b) -> Gemm."""
    overrides = overrides or {}
    conv_only = make_model(
        [helper.make_node("Conv", ["X", "W"], ["c"], name="conv")],
        [("X", ["N", 2, 6, 6])],
        ["c"],
        [t for t in model.graph.initializer if t.name == "W"],
    )
    session = onnxruntime.InferenceSession(
        conv_only.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    c = session.run(None, {"X": x})[0].astype(np.float64)
    flat = np.maximum(numpy_bn(c, model, "a", *overrides.get("a", ())), 0).reshape(len(x), -1)
    n2 = numpy_bn(flat, model, "b", *overrides.get("b", ()))
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "G"))
    return n2 @ weight.T.astype(np.float64), {"a": input_statistics(c), "b": input_statistics(flat)}


@pytest.fixture(scope="module", params=[17, 18, LATEST_OPSET])
def onnx_package(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelProto, Path]:
    """ReduceMean takes its axes as an attribute before opset 18 and as an input from 18 on."""
    directory = tmp_path_factory.mktemp(f"onnx{request.param}")
    model = conv_relu_bn_gemm(request.param)
    source = directory / "net.onnx"
    onnx.save_model(model, str(source))
    result = convert_onnx_file(
        source, repository=directory / "repo", name=None, version=None, sample=None
    )
    return model, Path(result.package_path)


def test_onnx_calibration_graph_matches_the_reference(onnx_package) -> None:
    model, package = onnx_package
    assert layer_names(package) == ["a", "b"]
    session = calibration_session(package)
    names = [output.name for output in session.get_outputs()]
    assert names == ["Y", *input_stat_output_names("a"), *input_stat_output_names("b")]
    for batch in BATCH_SIZES:
        x = np.random.default_rng(batch).standard_normal((batch, 2, 6, 6)).astype(np.float32)
        expected, statistics = conv_relu_bn_gemm_reference(model, x)
        values = dict(zip(names, session.run(None, {"X": x}), strict=True))
        assert_close(values["Y"], expected, f"output at batch {batch}")
        for layer in ("a", "b"):
            mean_name, var_name, count_name = input_stat_output_names(layer)
            mean, var, count = statistics[layer]
            assert_close(values[mean_name], mean, f"{layer} mean at batch {batch}")
            assert_close(values[var_name], var, f"{layer} var at batch {batch}")
            assert values[count_name].dtype == np.int64 and int(values[count_name]) == count


def test_onnx_calibration_graph_takes_other_running_statistics(onnx_package) -> None:
    model, package = onnx_package
    generator = np.random.default_rng(3)
    x = generator.standard_normal((5, 2, 6, 6)).astype(np.float32)
    overrides = {
        "a": (generator.uniform(-1, 1, 3), generator.uniform(0.5, 2, 3)),
        "b": (generator.uniform(-1, 1, 48), generator.uniform(0.5, 2, 48)),
    }
    feed = {"X": x}
    for layer, values in overrides.items():
        feed.update(
            zip(running_stat_input_names(layer), (np.float32(v) for v in values), strict=True)
        )
    expected, statistics = conv_relu_bn_gemm_reference(model, x, overrides)
    session = calibration_session(package)
    actual = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True)
    )
    assert_close(actual["Y"], expected, "output with overridden statistics")
    # BN(b)'s input comes after BN(a): its statistics follow the overridden BN(a).
    assert_close(actual["b.input_mean"], statistics["b"][0], "b mean after overridden a")


def check_unfolded_round_trip(package: Path, input_shape: tuple[int, ...], work: Path) -> None:
    """Re-converting the unfolded graph gives the same layers, with the statistics given, and
    a model.onnx equal to calibration.onnx fed those statistics."""
    manifest = parse_manifest((package / "manifest.json").read_bytes())
    calibration = onnx.load(str(package / CALIBRATION_GRAPH))
    generator = np.random.default_rng(5)
    new = {
        layer.name: (
            generator.uniform(-1, 1, layer.channels).astype(np.float32),
            generator.uniform(0.5, 2, layer.channels).astype(np.float32),
        )
        for layer in manifest.batchnorm.layers
    }
    source = unfolded_source(calibration, new)
    assert [value.name for value in source.graph.input] == [manifest.inputs[0].name]
    assert [value.name for value in source.graph.output] == [manifest.outputs[0].name]
    assert not {"ReduceMean", "Size", "Div"} & {node.op_type for node in source.graph.node}
    path = work / "unfolded.onnx"
    onnx.save_model(source, str(path))
    result = convert_onnx_file(path, repository=work / "repo", name=None, version=None, sample=None)
    again = parse_manifest((Path(result.package_path) / "manifest.json").read_bytes())
    assert [layer.name for layer in again.batchnorm.layers] == list(new)
    for layer in again.batchnorm.layers:
        np.testing.assert_array_equal(np.float32(layer.running_mean), new[layer.name][0])
        np.testing.assert_array_equal(np.float32(layer.running_var), new[layer.name][1])
    x = np.random.default_rng(9).standard_normal(input_shape).astype(np.float32)
    feed = {manifest.inputs[0].name: x}
    for layer, values in new.items():
        feed.update(zip(running_stat_input_names(layer), values, strict=True))
    (expected,) = calibration_session(package).run([manifest.outputs[0].name], feed)
    folded = onnxruntime.InferenceSession(
        str(Path(result.package_path) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (actual,) = folded.run(None, {manifest.inputs[0].name: x})
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_unfolded_source_round_trip_of_an_onnx_package(onnx_package, tmp_path: Path) -> None:
    check_unfolded_round_trip(onnx_package[1], (4, 2, 6, 6), tmp_path)


def test_unfolded_source_round_trip_of_a_torch_package(digits_packages, tmp_path: Path) -> None:
    """Torch layer names (module paths) survive too: the BN nodes bear them."""
    check_unfolded_round_trip(digits_packages["digits_resnet"][1], (4, 1, 8, 8), tmp_path)


def test_a_pinned_batch_axis_is_freed_but_not_on_the_statistics(tmp_path: Path) -> None:
    """A source exported at batch 2 with 2 channels: the batch axis becomes symbolic, while
    the [C] = [2] statistics keep their size; batch 5 runs and matches torch's hooks."""
    torch.manual_seed(3)
    module = calibrated(
        nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.BatchNorm2d(2),
            nn.Flatten(),
            nn.Linear(2 * 5 * 5, 3),
        ),
        (4, 2, 5, 5),
    )
    source = export(module, tmp_path / "pinned.onnx", (2, 2, 5, 5), dynamic=False)
    result = convert_onnx_file(
        source, repository=tmp_path / "repo", name=None, version=None, sample=None
    )
    package = Path(result.package_path)
    model = onnx.load(str(package / CALIBRATION_GRAPH))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    shapes = {
        output.name: [dim.dim_value for dim in output.type.tensor_type.shape.dim]
        for output in model.graph.output
    }
    for layer in layer_names(package):
        mean_name, var_name, count_name = input_stat_output_names(layer)
        assert (shapes[mean_name], shapes[var_name], shapes[count_name]) == ([2], [2], [])
    x = np.random.default_rng(4).standard_normal((5, 2, 5, 5)).astype(np.float32)
    reference = torch_float64(module)
    with bn_input_statistics(reference, ["1", "3"]) as recorded, torch.no_grad():
        expected = reference(torch.from_numpy(x).double()).numpy()
    actual = calibration_session(package).run(None, {"input": x})
    assert_close(actual[0], expected, "output at batch 5")
    for position, path in enumerate(["1", "3"]):
        mean, var, count = recorded[path][0]
        assert_close(actual[1 + 3 * position], mean, f"BN {path} input mean")
        assert_close(actual[2 + 3 * position], var, f"BN {path} input var")
        assert int(actual[3 + 3 * position]) == count == 5 * 5 * 5


def test_unfolded_source_refuses_unknown_layers_and_wrong_shapes(onnx_package) -> None:
    calibration = onnx.load(str(onnx_package[1] / CALIBRATION_GRAPH))
    with pytest.raises(ValueError, match="no BatchNorm layer nope"):
        unfolded_source(calibration, {"nope": (np.zeros(3), np.ones(3))})
    with pytest.raises(ValueError, match=r"a.running_mean needs shape \(3,\)"):
        unfolded_source(calibration, {"a": (np.zeros(4), np.ones(4))})


def test_double_precision_batchnorm_reads_float32_statistics_through_a_cast(tmp_path: Path) -> None:
    """The running-stat inputs are float32 whatever the model's dtype; the BN gets a Cast."""
    channels = 4
    inits = [
        numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)
        for t in bn_initializers("n", channels)
    ]
    graph = helper.make_graph(
        [bn_node("X", "Y", "n")],
        "double",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", channels, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", channels, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    build_calibration_graph(
        model, infer_tensor_info(model), source_layers(model, infer_tensor_info(model))
    )
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((5, channels, 3))
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    y, mean, var, count = session.run(None, {"X": x})
    expected = numpy_bn(x, model, "n", *[numpy_helper.to_array(t) for t in inits[2:]])
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert mean.dtype == np.float32 and count == 15
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-5, atol=1e-6)


def test_a_taken_output_name_is_refused() -> None:
    inits = [*bn_initializers("a", 3), initializer("k", array(0, 3))]
    nodes = [
        bn_node("X", "t", "a"),
        helper.make_node("Add", ["t", "k"], ["a.input_mean"], name="add"),
    ]
    model = make_model(nodes, [("X", ["N", 3])], ["a.input_mean"], inits)
    info = infer_tensor_info(model)
    with pytest.raises(UnsupportedSource, match=r"tensor a\.input_mean already exists"):
        build_calibration_graph(model, info, source_layers(model, info))


# ---------------------------------------------------------------- the package


def test_schema_2_package_lists_calibration_graph_and_still_loads(digits_packages) -> None:
    _module, package = digits_packages["digits_mobilenet"]
    manifest = parse_manifest((package / "manifest.json").read_bytes())
    assert manifest.schema_version == SCHEMA_VERSION == 2
    assert manifest.has_calibration_graph
    assert manifest.files[CALIBRATION_GRAPH] == sha256_file(package / CALIBRATION_GRAPH)
    assert manifest.verification["calibration"]["passed"] is True
    location = PackageLocation(package.parent.name, int(package.name), package)
    loaded = load_model(read_package(location), SessionConfig(providers=("CPUExecutionProvider",)))
    x = np.zeros((2, 1, 8, 8), np.float32)
    (served,) = loaded.eval_session.run(None, {"input": x})
    (calibrated_output,) = calibration_session(package).run(["output"], {"input": x})
    assert_close(
        served, calibrated_output.astype(np.float64), "model.onnx against calibration.onnx"
    )


def test_models_build_converts_a_schema_1_package_again(digits_packages, tmp_path: Path) -> None:
    """`bnfold models build` upgrades an old embedded repository: a built-in whose newest
    package is schema 1 gets a new schema-2 version; a current one is left alone."""
    _module, package = digits_packages["digits_mlp"]
    old = tmp_path / "repository" / "digits_mlp" / "1"
    shutil.copytree(package, old)
    (old / CALIBRATION_GRAPH).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    del manifest["files"][CALIBRATION_GRAPH]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not parse_manifest((old / "manifest.json").read_bytes()).has_calibration_graph

    (result,) = build_default_repository(tmp_path / "repository", names=["digits_mlp"])
    assert result.version == 2
    upgraded = parse_manifest((Path(result.package_path) / "manifest.json").read_bytes())
    assert upgraded.schema_version == SCHEMA_VERSION and upgraded.has_calibration_graph
    assert build_default_repository(tmp_path / "repository", names=["digits_mlp"]) == []


def test_an_ir_3_graph_becomes_ir_4_with_only_the_running_statistics_overridable() -> None:
    """IR 3 lists every initializer as an input; calibration.onnx keeps those constant."""
    nodes = [bn_node("X", "Y", "a")]
    model = make_model(nodes, [("X", ["N", 3, 2])], ["Y"], bn_initializers("a", 3), opset=9)
    model.ir_version = 3
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer
    )
    info = infer_tensor_info(model)
    build_calibration_graph(model, info, source_layers(model, info))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 4
    assert [value.name for value in model.graph.input] == ["X", "a.running_mean", "a.running_var"]
    x = np.random.default_rng(1).standard_normal((4, 3, 2)).astype(np.float32)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    mean, var = np.float32([0.5, -0.5, 0.0]), np.float32([1.5, 0.5, 2.0])
    (y,) = session.run(["Y"], {"X": x, "a.running_mean": mean, "a.running_var": var})
    assert_close(y, numpy_bn(x.astype(np.float64), model, "a", mean, var), "overridden IR 3 BN")


class SharedBatchNorm(nn.Module):
    """One BN module applied at two places: two layers (`bn@<node>`), one set of statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.second(torch.relu(self.bn(self.first(x)))))


def test_a_bn_module_applied_twice_gives_two_layers_with_their_own_inputs(
    tmp_path: Path,
) -> None:
    module = calibrated(SharedBatchNorm(), (8, 4))
    package = Path(convert_module(module, (2, 4), tmp_path / "repository").package_path)
    layers = layer_names(package)
    assert len(layers) == 2 and all(name.startswith("bn@") for name in layers)
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    reference = torch_float64(module)
    with bn_input_statistics(reference, ["bn"]) as recorded, torch.no_grad():
        expected = reference(torch.from_numpy(x).double()).numpy()
    session = calibration_session(package)
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input": x}), strict=True))
    assert_close(values["output"], expected, "output")
    for layer, (mean, var, count) in zip(layers, recorded["bn"], strict=True):
        mean_name, var_name, count_name = input_stat_output_names(layer)
        assert_close(values[mean_name], mean, f"{layer} input mean")
        assert_close(values[var_name], var, f"{layer} input var")
        assert int(values[count_name]) == count == 5
