"""`convert_onnx_file` end to end: torch-exported models, packages, external data, bad files.

The models are exported from torch the plain way (`dynamo=False`,
`do_constant_folding=False`), so their BatchNormalization nodes really remain;
the packages are checked against torch itself, on inputs the converter never
saw, with the converter's own float32 rule (atol 1e-5, rtol 1e-4: the
outputs here are O(1) sums of a few hundred products, whose float32 rounding
in two different kernels, torch and onnxruntime, stays near 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import helper, numpy_helper
from test_onnx_fold_conv import conv_bn
from torch import nn

from bnfold.convert.errors import ConvertError, InputShapeError, VerificationFailed
from bnfold.convert.onnx import io as onnx_io
from bnfold.convert.onnx import pipeline as onnx_pipeline
from bnfold.convert.onnx.graph import op_counts
from bnfold.convert.onnx.patterns import conv_forward as onnx_fold_conv
from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.convert.report import ConversionResult
from bnfold.package_format import sha256_file

from onnx_helpers import (
    array,
    export,
    initializer,
    list_as_input,
    make_model,
    save_with_external_data,
)

ATOL, RTOL = 1e-5, 1e-4


def calibrated(module: nn.Module) -> nn.Module:
    """Non-default γ, β and running statistics everywhere, then eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                for tensor, low, high in (
                    (bn.weight, 0.5, 2.0),
                    (bn.bias, -1.0, 1.0),
                    (bn.running_mean, -1.0, 1.0),
                    (bn.running_var, 0.5, 2.0),
                ):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return module.eval()


def mlp() -> nn.Module:
    """Linear-BN (forward into Gemm) and BN-Dropout-Linear (backward)."""
    torch.manual_seed(1)
    return calibrated(
        nn.Sequential(
            nn.Linear(6, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.BatchNorm1d(8),
            nn.Dropout(0.1),
            nn.Linear(8, 3),
        )
    )


def cnn(width: int = 4) -> nn.Module:
    """Conv-BN, and a BN after ReLU before a padded conv (kept: zero padding)."""
    torch.manual_seed(2)
    return calibrated(
        nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.BatchNorm2d(width),
            nn.Conv2d(width, width, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 3),
        )
    )


def convert(source: Path, repository: Path, **options: object) -> ConversionResult:
    arguments: dict[str, object] = {"name": None, "version": None, "sample": None}
    arguments.update(options)
    return convert_onnx_file(source, repository=repository, **arguments)  # type: ignore[arg-type]


def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def torch_outputs(module: nn.Module, x: np.ndarray, *, train_bn: bool = False) -> np.ndarray:
    reference = module
    if train_bn:
        import copy

        reference = copy.deepcopy(module)
        for bn in reference.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.train()
    with torch.no_grad():
        return reference(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def mlp_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    directory = tmp_path_factory.mktemp("mlp")
    module = mlp()
    source = export(module, directory / "mlp.onnx", (4, 6))
    result = convert(source, directory / "repo")
    return module, source, Path(result.package_path)


def test_package_matches_torch_in_eval_and_train_mode(mlp_package) -> None:
    module, _source, package = mlp_package
    assert sorted(p.name for p in package.iterdir()) == [
        "calibration.onnx",
        "manifest.json",
        "model.onnx",
        "train.onnx",
    ]
    for name in ("model.onnx", "train.onnx", "calibration.onnx"):
        onnx.checker.check_model(str(package / name), full_check=True)
    x = np.random.default_rng(5).standard_normal((7, 6)).astype(np.float32)
    (eval_output,) = run(package / "model.onnx", x)
    np.testing.assert_allclose(eval_output, torch_outputs(module, x), rtol=RTOL, atol=ATOL)
    train_outputs = run(package / "train.onnx", x)
    np.testing.assert_allclose(
        train_outputs[0], torch_outputs(module, x, train_bn=True), rtol=RTOL, atol=ATOL
    )
    assert len(train_outputs) == 1 + 2 * 2
    model = onnx.load(str(package / "model.onnx"))
    assert "BatchNormalization" not in op_counts(model.graph)


def test_manifest_describes_the_onnx_conversion(mlp_package) -> None:
    module, source, package = mlp_package
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "onnx", "ref": str(source), "sha256": sha256_file(source)}
    assert set(manifest["tool_versions"]) == {"bnfold", "onnx", "onnxruntime", "opset"}
    assert manifest["tool_versions"]["opset"] == 17
    assert manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
    assert manifest["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    batchnorm = manifest["batchnorm"]
    assert batchnorm["total"] == 2 and not batchnorm["kept"]
    assert [(f["direction"]) for f in batchnorm["folded"]] == ["forward", "backward"]
    first = batchnorm["layers"][0]
    assert first["channels"] == 8 and first["input_rank"] == 2 and first["channel_axis"] == 1
    np.testing.assert_allclose(first["running_mean"], module[1].running_mean.numpy(), rtol=1e-7)
    np.testing.assert_allclose(first["running_var"], module[1].running_var.numpy(), rtol=1e-7)
    assert first["batch_mean_output"] == f"{first['name']}.batch_mean"
    train_outputs = [o.name for o in onnx.load(str(package / "train.onnx")).graph.output]
    assert train_outputs[1:] == manifest["train_outputs"]
    assert manifest["train_outputs"] == [
        name
        for layer in batchnorm["layers"]
        for name in (layer["batch_mean_output"], layer["batch_var_output"])
    ]
    verification = manifest["verification"]
    assert verification["passed"] and verification["eval"]["passed"]
    assert verification["eval"]["samples"] == 1 + 4 + 16
    assert verification["tolerance"] == {"atol": 1e-5, "rtol": 1e-4}
    assert manifest["node_counts"]["batchnorm_before"] == 2
    assert manifest["node_counts"]["batchnorm_after"] == 0
    assert manifest["files"] == {
        name: sha256_file(package / name)
        for name in ("calibration.onnx", "model.onnx", "train.onnx")
    }


def test_kept_bn_is_reported_and_still_exact(tmp_path: Path) -> None:
    module = cnn()
    source = export(module, tmp_path / "cnn.onnx", (2, 2, 6, 6))
    result = convert(source, tmp_path / "repo", name="cnn", version=3)
    assert Path(result.package_path) == tmp_path / "repo" / "cnn" / "3"
    assert len(result.batchnorm.folded) == 1 and len(result.batchnorm.kept) == 1
    assert result.batchnorm.kept[0].reason.endswith("backward: the Conv zero-pads its input")
    assert result.node_counts["batchnorm_after"] == 1
    x = np.random.default_rng(6).standard_normal((3, 2, 6, 6)).astype(np.float32)
    (actual,) = run(Path(result.package_path) / "model.onnx", x)
    np.testing.assert_allclose(actual, torch_outputs(module, x), rtol=RTOL, atol=ATOL)


def test_sample_is_verified_too(tmp_path: Path) -> None:
    source = export(mlp(), tmp_path / "mlp.onnx", (4, 6))
    sample = np.random.default_rng(9).standard_normal((5, 6))
    result = convert(source, tmp_path / "repo", sample=sample)
    assert result.verification["eval"]["samples"] == 1 + 4 + 16 + 5


def test_sample_of_the_wrong_shape_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = export(mlp(), tmp_path / "mlp.onnx", (4, 6))
    with pytest.raises(InputShapeError, match=r"--sample has shape \(5, 7\)") as caught:
        convert(source, tmp_path / "repo", sample=np.zeros((5, 7), np.float32))
    assert caught.value.exit_code == 2
    assert not (tmp_path / "repo").exists()


def test_pinned_batch_axis_is_freed(tmp_path: Path) -> None:
    module = mlp()
    source = export(module, tmp_path / "pinned.onnx", (1, 6), dynamic=False)
    assert onnx.load(str(source)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    result = convert(source, tmp_path / "repo")
    assert result.inputs[0].shape == [-1, 6]
    x = np.random.default_rng(4).standard_normal((2, 6)).astype(np.float32)
    package = Path(result.package_path)
    (actual,) = run(package / "model.onnx", x)
    np.testing.assert_allclose(actual, torch_outputs(module, x), rtol=RTOL, atol=ATOL)
    assert run(package / "train.onnx", x)[0].shape == (2, 3)
    assert "notes" not in json.loads((package / "manifest.json").read_text())


def test_batch_axis_that_cannot_be_freed_stays_pinned_and_is_reported(tmp_path: Path) -> None:
    """A Reshape to the constant shape (1, 12) only works for batch 1."""
    nodes = [
        helper.make_node("Reshape", ["X", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "b"], ["Y"], name="gemm", transB=1),
    ]
    inits = [
        initializer("shape", np.array([1, 12], np.int64)),
        initializer("W", array(1, 3, 12)),
        initializer("b", array(2, 3)),
    ]
    source = tmp_path / "pinned.onnx"
    onnx.save(make_model(nodes, [("X", [1, 3, 4])], ["Y"], inits), str(source))
    result = convert(source, tmp_path / "repo")
    assert result.inputs[0].shape == [1, 3, 4]
    manifest = json.loads((Path(result.package_path) / "manifest.json").read_text())
    assert manifest["notes"][0].startswith("the batch axis stays fixed at 1:")


def test_external_data_is_read_and_written(tmp_path: Path) -> None:
    """Weights over 1 KiB go to the side file (16·16·3·3 floats: 9 KiB), the rest stays inline."""
    module = cnn(width=16)
    plain = export(module, tmp_path / "plain.onnx", (2, 2, 6, 6))
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    source = save_with_external_data(plain, source_dir / "cnn.onnx")
    result = convert(source, tmp_path / "repo")
    package = Path(result.package_path)
    files = sorted(p.name for p in package.iterdir())
    assert files == [
        "calibration.onnx",
        "calibration.onnx.data",
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "train.onnx",
        "train.onnx.data",
    ]
    manifest = json.loads((package / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    weights_inline = onnx.load(str(package / "model.onnx"), load_external_data=False)
    assert all(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in weights_inline.graph.initializer
        if t.ByteSize() > 1100
    )
    x = np.random.default_rng(8).standard_normal((3, 2, 6, 6)).astype(np.float32)
    (actual,) = run(package / "model.onnx", x)
    np.testing.assert_allclose(actual, torch_outputs(module, x), rtol=RTOL, atol=ATOL)
    calibrated = run(package / "calibration.onnx", x)
    np.testing.assert_allclose(calibrated[0], torch_outputs(module, x), rtol=RTOL, atol=ATOL)


def test_missing_external_data_is_a_source_error(tmp_path: Path) -> None:
    plain = export(cnn(), tmp_path / "plain.onnx", (2, 2, 6, 6))
    source = save_with_external_data(plain, tmp_path / "cnn.onnx")
    (tmp_path / "cnn.onnx.data").unlink()
    with pytest.raises(ConvertError) as caught:
        convert(source, tmp_path / "repo")
    assert caught.value.exit_code == 2
    assert "cnn.onnx" in str(caught.value)


def _bad_model_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    valid = export(mlp(), tmp_path / "valid.onnx", (4, 6))
    files: dict[str, tuple[Path, str]] = {}
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n" * 20)
    files["not onnx"] = (text, "is not an ONNX model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    files["truncated"] = (truncated, "truncated")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    files["empty"] = (empty, "is not an ONNX model")
    files["missing"] = (tmp_path / "absent.onnx", "no such file")
    for opset, label in ((8, "old opset"), (onnx.defs.onnx_opset_version() + 1, "new opset")):
        model = onnx.load(str(valid))
        model.opset_import[0].version = opset
        path = tmp_path / f"opset{opset}.onnx"
        onnx.save(model, str(path))
        files[label] = (path, f"uses opset {opset}")
    constant_only = make_model(
        [helper.make_node("Relu", ["W"], ["Y"], name="relu")],
        [],
        ["Y"],
        [initializer("W", array(0, 3))],
    )
    path = tmp_path / "no_inputs.onnx"
    onnx.save(constant_only, str(path))
    files["no inputs"] = (path, "has no inputs")
    return files


@pytest.mark.parametrize(
    "case", ["not onnx", "truncated", "empty", "missing", "old opset", "new opset", "no inputs"]
)
def test_bad_files_exit_2_with_a_clear_message(tmp_path: Path, case: str) -> None:
    path, message = _bad_model_files(tmp_path)[case]
    with pytest.raises(ConvertError, match=message) as caught:
        convert(path, tmp_path / "repo")
    assert caught.value.exit_code == 2
    assert not (tmp_path / "repo").exists()


def test_failed_verification_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    """A fold that drops the BN's shift must be caught, and leave no package behind."""
    real_fold = onnx_fold_conv.fold_after_layer

    def fold_without_shift(weight, bias, bn, **kwargs):
        folded = real_fold(weight, bias, bn, **kwargs)
        return type(folded)(folded.weight, np.zeros_like(folded.bias))

    monkeypatch.setattr(onnx_fold_conv, "fold_after_layer", fold_without_shift)
    source = export(cnn(), tmp_path / "cnn.onnx", (2, 2, 6, 6))
    with pytest.raises(VerificationFailed, match="verification failed, nothing written") as caught:
        convert(source, tmp_path / "repo")
    assert caught.value.exit_code == 1
    assert not (tmp_path / "repo").exists()


def test_models_over_the_protobuf_limit_are_written_with_external_data(
    tmp_path: Path, monkeypatch
) -> None:
    """The >2 GB path, with the limit lowered to 1 KiB instead of a real 2 GB file.

    Every proto too big for one message (the package's graphs, the train
    reference's stages) then goes through external data, as a real large
    model would.
    """
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1024)
    module = cnn(width=16)
    source = export(module, tmp_path / "cnn.onnx", (2, 2, 6, 6))
    result = convert(source, tmp_path / "repo")
    package = Path(result.package_path)
    assert (package / "model.onnx.data").is_file() and (package / "train.onnx.data").is_file()
    assert result.verification["passed"]
    x = np.random.default_rng(8).standard_normal((3, 2, 6, 6)).astype(np.float32)
    (actual,) = run(package / "model.onnx", x)
    np.testing.assert_allclose(actual, torch_outputs(module, x), rtol=RTOL, atol=ATOL)


def test_wrong_train_graph_fails_verification(tmp_path: Path, monkeypatch) -> None:
    """The train check is independent of the train graph: a wrong ε there is caught."""
    real_build = onnx_pipeline.build_train_graph

    def build_with_wrong_epsilon(model, tensor_info):
        names = real_build(model, tensor_info)
        for tensor in model.graph.initializer:
            if tensor.name.endswith("/epsilon"):
                tensor.CopyFrom(numpy_helper.from_array(np.array(0.5, np.float32), tensor.name))
        return names

    monkeypatch.setattr(onnx_pipeline, "build_train_graph", build_with_wrong_epsilon)
    source = export(mlp(), tmp_path / "mlp.onnx", (4, 6))
    with pytest.raises(VerificationFailed, match="train batch") as caught:
        convert(source, tmp_path / "repo")
    assert "eval batch" not in str(caught.value)
    assert not (tmp_path / "repo").exists()


# ---- what the service could not serve, or what folding silently changed -----------------


def conv_bn_source(
    path: Path, *, as_inputs: tuple[str, ...] = (), overridable: tuple[str, ...] = ()
) -> Path:
    """conv_bn() (X ─► Conv ─► BN ─► Y) with some initializers made graph inputs or
    overridable defaults."""
    model = conv_bn()
    for name in (*as_inputs, *overridable):
        list_as_input(model, name, keep_initializer=name in overridable)
    onnx.save(model, str(path))
    return path


def test_statistics_as_graph_inputs_keep_the_bn_and_write_no_layer(tmp_path: Path) -> None:
    """No running statistics to record: the service would refuse a layer without them."""
    source = conv_bn_source(tmp_path / "stats.onnx", as_inputs=("bn.mean", "bn.var"))
    result = convert(source, tmp_path / "repo")
    package = Path(result.package_path)
    manifest = json.loads((package / "manifest.json").read_text())
    (kept,) = manifest["batchnorm"]["kept"]
    assert kept["reason"].endswith(
        "its running mean or variance is not constant (no running statistics), "
        "so it is not in batchnorm.layers (compare skips it)"
    )
    assert manifest["batchnorm"]["layers"] == [] and manifest["train_outputs"] == []
    assert [spec["name"] for spec in manifest["inputs"]] == ["X", "bn.mean", "bn.var"]
    train = onnx.load(str(package / "train.onnx"))
    assert [output.name for output in train.graph.output] == ["Y"]
    assert [value.name for value in train.graph.input] == ["X", "bn.mean", "bn.var"]


def test_overridable_initializers_stay_overridable_in_the_package(tmp_path: Path) -> None:
    """An initializer listed in graph.input is a default a caller may replace: never folded."""
    source = conv_bn_source(tmp_path / "overridable.onnx", overridable=("W", "bn.var"))
    result = convert(source, tmp_path / "repo")
    assert result.batchnorm.folded == [] and [spec.name for spec in result.inputs] == ["X"]
    assert "overridable graph input" in result.batchnorm.kept[0].reason
    package = Path(result.package_path)
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 5)).astype(np.float32)
    override = {
        "X": x,
        "W": array(9, 6, 4, 3, 3),
        "bn.var": array(10, 6, low=0.5, high=2.0),
    }
    for graph in ("model.onnx", "train.onnx"):
        session = onnxruntime.InferenceSession(
            str(package / graph), providers=["CPUExecutionProvider"]
        )
        assert [arg.name for arg in session.get_inputs()] == ["X"]
        assert {arg.name for arg in session.get_overridable_initializers()} == {"W", "bn.var"}
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = onnxruntime.InferenceSession(
        str(source), options, providers=["CPUExecutionProvider"]
    )
    (expected,) = reference.run(None, override)
    (actual,) = run_feed(package / "model.onnx", override)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def run_feed(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_input_shape_applies_to_single_input_models_only(tmp_path: Path) -> None:
    source = conv_bn_source(tmp_path / "two_inputs.onnx", as_inputs=("bn.scale",))
    with pytest.raises(
        InputShapeError, match=r"gives one shape but the model has 2 inputs \(X, bn.scale\)"
    ):
        convert(source, tmp_path / "repo", input_shape=(1, 4, 5, 5))
    assert not (tmp_path / "repo").exists()


def test_input_too_large_to_verify_is_refused_before_allocating(tmp_path: Path) -> None:
    """The graph itself fixes 65536 × 65536 values per row: 16 GiB of float32 for one row."""
    nodes = [helper.make_node("Relu", ["X"], ["Y"], name="relu")]
    source = tmp_path / "huge.onnx"
    onnx.save(make_model(nodes, [("X", ["N", 65536, 65536])], ["Y"], []), str(source))
    with pytest.raises(
        InputShapeError,
        match=r"input X is too large to verify: a batch of shape \(1, 65536, 65536\) holds 4,294,967,296 values \(16 GiB of float32\)",
    ):
        convert(source, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
