"""`recalibrate` (the library) against references computed independently.

The references never use bnfold's recalibration code: torch forward hooks on
the original module (or numpy on a hand-made ONNX graph) collect each BN's
input, and numpy's float64 mean and `var(ddof=1)` give the statistics.

* sequential: BN modules in forward order; for each, all the data through the
  eval model with the earlier BNs already updated, its input hooked.
* batch: BN modules in train mode, Dropout in eval, the data in the same chunks
  as bnfold's, each BN's inputs from every chunk concatenated (exact pooling).

Tolerances. Statistics: bnfold reduces in float32 inside onnxruntime (chunk
means and variances over up to ~4000 values per channel) and pools in float64;
the reference is float64 throughout. Float32 summation of n values has a
relative error of order n·2^-24 in the worst case, ~1e-5 at worst here, so
|Δvariance| ≤ 1e-4·variance, and |Δmean| ≤ 1e-4·(|mean| + std): a mean that
cancels to ~0 is judged on the channel's scale, not on its own size.
Outputs: the converter's own rule (|Δ| ≤ 1e-5 + 1e-4·|expected|, checked by
`within_float32_tolerance`) between the new model.onnx and the torch module
with the reference statistics loaded.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.errors import CalibrationDataError, NotRecalibratable, PackageNotFound
from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.convert.recalibration import RecalibrationRequest, recalibrate, statistics
from bnfold.convert.recalibration.data import calibration_data
from bnfold.convert.recalibration.passes import layer_depths, pruned
from bnfold.convert.recalibration.statistics import chunk_bounds
from bnfold.models.data import digits_dataset
from bnfold.models.registry import BUILTIN_MODELS
from bnfold.package_format import (
    CALIBRATION_GRAPH,
    ManifestTensor,
    input_stat_output_names,
)

from convert_helpers import calibrated, convert_module, within_float32_tolerance
from onnx_helpers import array, bn_initializers, bn_node, initializer, make_model

DIGITS = ("digits_mlp", "digits_resnet", "digits_mobilenet", "digits_conv1d")
SAMPLES = 300
BATCH_SIZE = 64
STAT_RTOL = 1e-4

Statistics = dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- torch references


def batchnorms_in_forward_order(module: nn.Module, batch: np.ndarray) -> list[str]:
    """The BN modules' names in the order a forward pass reaches them."""
    order: list[str] = []
    hooks = [
        child.register_forward_pre_hook(lambda _m, _i, name=name: order.append(name))
        for name, child in module.named_modules()
        if isinstance(child, _BatchNorm)
    ]
    with torch.no_grad():
        copy.deepcopy(module).eval()(torch.from_numpy(batch[:2]))
    for hook in hooks:
        hook.remove()
    return order


def _channels_rows(value: torch.Tensor) -> np.ndarray:
    """A BN input (N, C, *spatial) as float64 (C, N·spatial)."""
    return value.detach().double().transpose(0, 1).reshape(value.shape[1], -1).numpy()


def _moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values.mean(axis=1), values.var(axis=1, ddof=1)


def sequential_reference(module: nn.Module, data: np.ndarray) -> tuple[nn.Module, Statistics]:
    """The eval module with each BN's statistics set, in forward order, from its input."""
    model = copy.deepcopy(module).eval()
    modules = dict(model.named_modules())
    statistics: Statistics = {}
    for name in batchnorms_in_forward_order(model, data):
        seen: list[np.ndarray] = []
        hook = modules[name].register_forward_pre_hook(
            lambda _m, inputs, seen=seen: seen.append(_channels_rows(inputs[0]))
        )
        with torch.no_grad():
            model(torch.from_numpy(data))
        hook.remove()
        statistics[name] = _moments(seen[0])
        _load(modules[name], statistics[name])
    return model, statistics


def batch_reference(
    module: nn.Module, data: np.ndarray, batch_size: int
) -> tuple[nn.Module, Statistics]:
    """Train-mode BNs over bnfold's chunks, their inputs pooled; the eval module with them."""
    model = copy.deepcopy(module).eval()
    modules = dict(model.named_modules())
    names = batchnorms_in_forward_order(model, data)
    seen: dict[str, list[np.ndarray]] = {name: [] for name in names}
    hooks = []
    for name in names:
        modules[name].train()
        hooks.append(
            modules[name].register_forward_pre_hook(
                lambda _m, inputs, name=name: seen[name].append(_channels_rows(inputs[0]))
            )
        )
    with torch.no_grad():
        for start, stop in chunk_bounds(len(data), batch_size):
            model(torch.from_numpy(data[start:stop]))
    for hook in hooks:
        hook.remove()
    statistics = {name: _moments(np.concatenate(seen[name], axis=1)) for name in names}
    model.eval()
    for name in names:
        _load(modules[name], statistics[name])
    return model, statistics


def _load(batchnorm: nn.Module, statistics: tuple[np.ndarray, np.ndarray]) -> None:
    with torch.no_grad():
        batchnorm.running_mean.copy_(torch.from_numpy(statistics[0]))
        batchnorm.running_var.copy_(torch.from_numpy(statistics[1]))


REFERENCES: dict[str, Callable[[nn.Module, np.ndarray], tuple[nn.Module, Statistics]]] = {
    "sequential": sequential_reference,
    "batch": lambda module, data: batch_reference(module, data, BATCH_SIZE),
}


# ---------------------------------------------------------------- checks


def manifest_of(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


def assert_statistics_match(package: Path, expected: Statistics) -> None:
    layers = {layer["name"]: layer for layer in manifest_of(package)["batchnorm"]["layers"]}
    assert set(layers) == set(expected)
    for name, (mean, var) in expected.items():
        got_mean = np.asarray(layers[name]["running_mean"])
        got_var = np.asarray(layers[name]["running_var"])
        scale = np.abs(mean) + np.sqrt(var)
        assert np.all(np.abs(got_mean - mean) <= STAT_RTOL * scale), name
        assert np.all(np.abs(got_var - var) <= STAT_RTOL * var), name


def run_package(package: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(package / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def assert_model_matches(package: Path, reference: nn.Module, batch: np.ndarray) -> None:
    with torch.no_grad():
        expected = reference(torch.from_numpy(batch)).numpy()
    assert within_float32_tolerance(run_package(package, batch), expected)


def shifted(values: np.ndarray) -> np.ndarray:
    """A covariate shift: contrast halved, brightness up."""
    return (values * 0.5 + 0.3).astype(np.float32)


# ---------------------------------------------------------------- the digits models


@dataclass
class DigitsPackages:
    """The four digits models, loaded, and converted into `repository` as version 1."""

    repository: Path
    modules: dict[str, nn.Module]

    def copy(self, name: str, repository: Path) -> Path:
        """A repository of its own holding `name` version 1, for a test to write into."""
        shutil.copytree(self.repository / name / "1", repository / name / "1")
        return repository


@pytest.fixture(scope="module")
def digits_packages(tmp_path_factory: pytest.TempPathFactory) -> DigitsPackages:
    repository = tmp_path_factory.mktemp("recalibrate") / "repository"
    modules = {}
    for name in DIGITS:
        spec = BUILTIN_MODELS[name]
        modules[name] = spec.load()
        convert_module(modules[name], spec.input_shape, repository, name=name)
    return DigitsPackages(repository, modules)


@pytest.fixture(scope="module")
def shifted_digits() -> np.ndarray:
    return shifted(digits_dataset().train_inputs[:SAMPLES])


@pytest.mark.parametrize("method", ["sequential", "batch"])
@pytest.mark.parametrize("name", DIGITS)
def test_digits_models_match_the_torch_reference(
    digits_packages: DigitsPackages,
    shifted_digits: np.ndarray,
    tmp_path: Path,
    name: str,
    method: str,
) -> None:
    repository = digits_packages.copy(name, tmp_path / "repository")
    module = digits_packages.modules[name]
    data = BUILTIN_MODELS[name].digits_inputs(shifted_digits)
    reference, expected = REFERENCES[method](module, data)

    result = recalibrate(
        RecalibrationRequest(
            repository=repository, name=name, data=data, method=method, batch_size=BATCH_SIZE
        )
    )

    package = Path(result.package_path)
    assert package == repository / name / "2"
    assert_statistics_match(package, expected)
    assert_model_matches(package, reference, data[:64])
    held_out = BUILTIN_MODELS[name].digits_inputs(shifted(digits_dataset().test_inputs[:64]))
    assert_model_matches(package, reference, held_out)
    manifest = manifest_of(package)
    original = manifest_of(repository / name / "1")
    assert manifest["source"] == original["source"]
    assert manifest["recalibrations"] == [
        {
            "from_version": 1,
            "method": method,
            "samples": SAMPLES,
            "data_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            "data": "in-memory arrays",
            "created": manifest["recalibrations"][0]["created"],
        }
    ]
    assert CALIBRATION_GRAPH in manifest["files"]
    assert {layer.name for layer in result.layers} == set(expected)
    kl_before = [layer.before["kl_divergence"]["mean"] for layer in result.layers]
    assert kl_before == sorted(kl_before, reverse=True)  # worst first
    # The shift moved every BN's input away from the trained statistics.
    assert all(layer.before["kl_divergence"]["mean"] > 1e-3 for layer in result.layers)
    if method == "sequential":
        # Eval mode now sees exactly the statistics it normalises with (up to n/(n-1)).
        assert all(layer.after["kl_divergence"]["mean"] < 1e-5 for layer in result.layers)
        assert all(layer.after["mean_shift"]["max"] < 1e-3 for layer in result.layers)


def test_recalibrating_twice_records_both_steps(
    digits_packages: DigitsPackages, shifted_digits: np.ndarray, tmp_path: Path
) -> None:
    """The second step starts from the first's package (its statistics already fit: ~no
    drift before) and the provenance chain lists both, oldest first."""
    repository = digits_packages.copy("digits_resnet", tmp_path / "repository")
    data = BUILTIN_MODELS["digits_resnet"].digits_inputs(shifted_digits)
    first = recalibrate(RecalibrationRequest(repository, "digits_resnet", data))
    second = recalibrate(
        RecalibrationRequest(repository, "digits_resnet", data[:100], method="batch", new_version=7)
    )
    assert (first.from_version, first.version, second.from_version, second.version) == (1, 2, 2, 7)
    assert first.passes == 5  # depths 0..4: stem, block 1 (2), block 2's two branches, its bn2
    chain = manifest_of(Path(second.package_path))["recalibrations"]
    assert [(step["from_version"], step["method"], step["samples"]) for step in chain] == [
        (1, "sequential", SAMPLES),
        (2, "batch", 100),
    ]
    assert max(layer.before["kl_divergence"]["mean"] for layer in second.layers) < 0.05


# ---------------------------------------------------------------- torch models with every kind of BN


class Mixed(nn.Module):
    """Folded conv BNs, a depthwise conv, a BN kept (before a zero-padded conv), a residual
    add and a BatchNorm1d head between Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.kept = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        mixed = self.mix(self.kept(self.depthwise(stem))) + stem
        return self.head(mixed.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def mixed_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = calibrated(Mixed(), (16, 3, 6, 6))
    repository = tmp_path_factory.mktemp("mixed") / "repository"
    conversion = convert_module(module, (1, 3, 6, 6), repository, name="mixed")
    assert [kept.name for kept in conversion.batchnorm.kept] == ["kept"]
    return module, repository


@pytest.mark.parametrize("method", ["sequential", "batch"])
def test_kept_batchnorms_residuals_depthwise_and_a_batchnorm1d_head(
    mixed_package: tuple[nn.Module, Path], tmp_path: Path, method: str
) -> None:
    module, source = mixed_package
    repository = tmp_path / "repository"
    shutil.copytree(source, repository)
    data = (np.random.default_rng(3).standard_normal((150, 3, 6, 6)) * 1.5 - 0.5).astype(np.float32)
    reference, expected = REFERENCES[method](module, data)
    result = recalibrate(
        RecalibrationRequest(repository, "mixed", data, method=method, batch_size=BATCH_SIZE)
    )
    package = Path(result.package_path)
    assert_statistics_match(package, expected)
    assert_model_matches(package, reference, data[:32])
    assert {layer.name: layer.depth for layer in result.layers} == {
        "stem.1": 0,
        "depthwise.1": 1,
        "kept": 2,
        "head.1": 3,
    }


# ---------------------------------------------------------------- a hand-made ONNX graph, numpy reference


def branching_graph() -> onnx.ModelProto:
    """x ─► MatMul ─► BN a ─► Relu ─┬─► MatMul ─► BN b ─┐
    └─► MatMul ─► BN c ─┴─► Add ─► BN d ─► y"""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        bn_node("h1", "a_out", "a"),
        helper.make_node("Relu", ["a_out"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        bn_node("h2", "b_out", "b"),
        helper.make_node("MatMul", ["r1", "w3"], ["h3"], name="mm3"),
        bn_node("h3", "c_out", "c"),
        helper.make_node("Add", ["b_out", "c_out"], ["s"], name="add"),
        bn_node("s", "y", "d"),
    ]
    weights = [
        initializer("w1", array(1, 4, 6)),
        initializer("w2", array(2, 6, 5)),
        initializer("w3", array(3, 6, 5)),
    ]
    parameters = [
        tensor
        for seed, (prefix, channels) in enumerate((("a", 6), ("b", 5), ("c", 5), ("d", 5)))
        for tensor in bn_initializers(prefix, channels, seed=10 * seed)
    ]
    return make_model(nodes, [("x", ["batch", 4])], ["y"], [*weights, *parameters])


def numpy_sequential(model: onnx.ModelProto, data: np.ndarray) -> Statistics:
    """The graph's forward in float64 numpy, each BN updated before the next uses it."""
    values = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    statistics: Statistics = {}

    def batchnorm(x: np.ndarray, name: str) -> np.ndarray:
        statistics[name] = (x.mean(axis=0), x.var(axis=0, ddof=1))
        mean, var = statistics[name]
        scale, bias = values[f"{name}.scale"], values[f"{name}.bias"]
        return (x - mean) / np.sqrt(var + 1e-3) * scale + bias

    x = data.astype(np.float64)
    r1 = np.maximum(batchnorm(x @ values["w1"], "a"), 0.0)
    total = batchnorm(r1 @ values["w2"], "b") + batchnorm(r1 @ values["w3"], "c")
    batchnorm(total, "d")
    return statistics


@pytest.fixture(scope="module")
def branching_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto]:
    model = branching_graph()
    directory = tmp_path_factory.mktemp("branching")
    onnx.save(model, str(directory / "branching.onnx"))
    repository = directory / "repository"
    convert_onnx_file(
        directory / "branching.onnx",
        repository=repository,
        name="branching",
        version=1,
        sample=None,
    )
    return repository, model


@pytest.fixture
def branching_package(
    branching_source: tuple[Path, onnx.ModelProto], tmp_path: Path
) -> tuple[Path, onnx.ModelProto]:
    """A copy of the converted branching graph for one test to write into."""
    source, model = branching_source
    return Path(shutil.copytree(source, tmp_path / "repository")), model


def test_depths_and_passes_on_a_branching_graph(
    branching_package: tuple[Path, onnx.ModelProto],
) -> None:
    repository, _ = branching_package
    calibration = onnx.load(str(repository / "branching" / "1" / CALIBRATION_GRAPH))
    assert layer_depths(calibration, ["a", "b", "c", "d"]) == {"a": 0, "b": 1, "c": 1, "d": 2}
    shallow = pruned(calibration, list(input_stat_output_names("a")))
    operators = {node.op_type for node in shallow.graph.node}
    assert "BatchNormalization" not in operators and "Add" not in operators
    assert [value.name for value in shallow.graph.output] == list(input_stat_output_names("a"))
    middle = pruned(calibration, [*input_stat_output_names("b"), *input_stat_output_names("c")])
    assert [node.name for node in middle.graph.node if node.op_type == "BatchNormalization"] == [
        "a"
    ]
    assert {value.name for value in middle.graph.input} >= {"a.running_mean", "a.running_var"}


def test_a_hand_made_graph_matches_numpy(
    branching_package: tuple[Path, onnx.ModelProto],
) -> None:
    repository, model = branching_package
    data = (np.random.default_rng(5).standard_normal((200, 4)) * 3 + 1).astype(np.float32)
    result = recalibrate(RecalibrationRequest(repository, "branching", data, batch_size=48))
    assert result.passes == 3
    assert_statistics_match(Path(result.package_path), numpy_sequential(model, data))


def test_graphs_over_the_protobuf_limit_run_from_disk(
    branching_package: tuple[Path, onnx.ModelProto], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass graphs too big for one protobuf go through a scratch file with external data;
    the batch method opens the full graph twice, so its weights must survive the first."""
    repository, _ = branching_package
    data = (np.random.default_rng(6).standard_normal((90, 4)) * 2).astype(np.float32)
    request = RecalibrationRequest(
        repository, "branching", data, version=1, method="batch", batch_size=30
    )
    in_memory = recalibrate(request)
    monkeypatch.setattr(statistics, "fits_in_one_proto", lambda _model: False)
    on_disk = recalibrate(request)
    for first, second in zip(in_memory.layers, on_disk.layers, strict=True):
        assert first.name == second.name
        assert first.after == second.after and first.before == second.before
    assert (
        manifest_of(Path(in_memory.package_path))["batchnorm"]["layers"]
        == manifest_of(Path(on_disk.package_path))["batchnorm"]["layers"]
    )


# ---------------------------------------------------------------- errors: nothing written


def test_unknown_models_versions_and_bad_data_write_nothing(
    branching_package: tuple[Path, onnx.ModelProto],
) -> None:
    repository, _ = branching_package
    before = sorted(path.relative_to(repository) for path in repository.rglob("*"))
    good = np.zeros((8, 4), np.float32)
    with pytest.raises(PackageNotFound, match="no model 'nothing'"):
        recalibrate(RecalibrationRequest(repository, "nothing", good))
    with pytest.raises(PackageNotFound, match="has no version 3; it has 1"):
        recalibrate(RecalibrationRequest(repository, "branching", good, version=3))
    with pytest.raises(CalibrationDataError, match="float64, the model takes float32"):
        recalibrate(RecalibrationRequest(repository, "branching", good.astype(np.float64)))
    with pytest.raises(CalibrationDataError, match="layer a sees 1 value per channel"):
        recalibrate(RecalibrationRequest(repository, "branching", good[:1]))
    with pytest.raises(CalibrationDataError, match="--batch-size of at least 2"):
        recalibrate(
            RecalibrationRequest(repository, "branching", good, method="batch", batch_size=1)
        )
    assert sorted(path.relative_to(repository) for path in repository.rglob("*")) == before


def test_a_package_without_batchnorm_layers_is_not_recalibratable(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["batch", 4])],
        ["y"],
        [initializer("w", array(1, 4, 2))],
    )
    onnx.save(model, str(tmp_path / "plain.onnx"))
    convert_onnx_file(
        tmp_path / "plain.onnx", repository=tmp_path / "repo", name="plain", version=1, sample=None
    )
    with pytest.raises(NotRecalibratable, match="no BatchNorm layers"):
        recalibrate(RecalibrationRequest(tmp_path / "repo", "plain", np.ones((4, 4), np.float32)))


# ---------------------------------------------------------------- data


def test_data_files_directories_and_their_checks(tmp_path: Path) -> None:
    inputs = (ManifestTensor(name="x", datatype="FP32", shape=(-1, 2, 3)),)
    samples = np.arange(5 * 6, dtype=np.float32).reshape(5, 2, 3)
    np.save(tmp_path / "one.npy", samples)
    np.savez(tmp_path / "named.npz", anything=samples)
    directory = tmp_path / "parts"
    directory.mkdir()
    np.save(directory / "b.npy", samples[3:])
    np.save(directory / "a.npy", samples[:3])
    (directory / "notes.txt").write_text("not data")
    for source in (tmp_path / "one.npy", tmp_path / "named.npz", directory, samples):
        data = calibration_data(source, inputs)
        np.testing.assert_array_equal(data.arrays["x"], samples)
        assert data.sha256 == hashlib.sha256(samples.tobytes()).hexdigest()
    assert calibration_data(directory, inputs, max_samples=2).arrays["x"].shape == (2, 2, 3)

    problems = {
        "axis 1 must be 2": samples.reshape(5, 3, 2),
        "has shape \\(5, 6\\)": samples.reshape(5, 6),
        "NaN or Inf \\(first in sample 1\\)": np.where(
            np.arange(5)[:, None, None] == 1, np.inf, samples
        ).astype(np.float32),
        "x.astype\\(np.float32\\)": samples.astype(np.float16),
        "holds no samples": samples[:0],
    }
    for message, bad in problems.items():
        with pytest.raises(CalibrationDataError, match=message):
            calibration_data(bad, inputs)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    for path, message in (
        (tmp_path / "broken.npy", "cannot read data"),
        (tmp_path / "missing.npy", "no such file"),
        (tmp_path / "data.csv", "give an .npy file"),
    ):
        if path.suffix == ".csv":
            path.write_text("1,2")
        with pytest.raises(CalibrationDataError, match=message):
            calibration_data(path, inputs)
    two = (*inputs, ManifestTensor(name="mask", datatype="INT64", shape=(-1,)))
    with pytest.raises(CalibrationDataError, match="one array per input name"):
        calibration_data(tmp_path / "one.npy", two)
    np.savez(tmp_path / "two.npz", x=samples, mask=np.arange(5))
    both = calibration_data(tmp_path / "two.npz", two)
    assert both.sha256 == hashlib.sha256(samples.tobytes() + np.arange(5).tobytes()).hexdigest()


def test_chunks_are_as_even_as_possible() -> None:
    for samples, batch_size in ((300, 64), (65, 64), (7, 3), (1, 8), (128, 64)):
        bounds = chunk_bounds(samples, batch_size)
        sizes = [stop - start for start, stop in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == samples
        assert all(earlier[1] == later[0] for earlier, later in itertools.pairwise(bounds))
        assert len(bounds) == -(-samples // batch_size)
        assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1


def test_a_fixed_batch_axis_sets_the_chunk_size() -> None:
    from bnfold.convert.recalibration.pipeline import DEFAULT_BATCH_SIZE, _batch_size

    dynamic = (ManifestTensor(name="x", datatype="FP32", shape=(-1, 4)),)
    fixed = (ManifestTensor(name="x", datatype="FP32", shape=(4, 4)),)
    assert _batch_size(None, dynamic, 10) == DEFAULT_BATCH_SIZE
    assert _batch_size(7, dynamic, 10) == 7
    assert _batch_size(None, fixed, 12) == 4 == _batch_size(4, fixed, 12)
    with pytest.raises(CalibrationDataError, match="use --batch-size 4"):
        _batch_size(8, fixed, 12)
    with pytest.raises(CalibrationDataError, match="give a multiple of 4"):
        _batch_size(None, fixed, 10)
