"""`bnfold inspect`: the BN report of an .onnx file or a package, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.convert.onnx.inspect import inspect_path
from bnfold.convert.onnx.pipeline import convert_onnx_file

from onnx_helpers import array, bn_initializers, bn_node, initializer, make_model

runner = CliRunner()


def two_bn_model(path: Path) -> Path:
    """X ─► Gemm ─► BN(a) ─► Relu ─► BN(b) ─► Y: a folds forward, b has nowhere to go."""
    nodes = [
        helper.make_node("Gemm", ["X", "W", "c"], ["g"], name="gemm", transB=1),
        bn_node("g", "n", "a"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        bn_node("r", "Y", "b"),
    ]
    inits = [
        initializer("W", array(1, 4, 3)),
        initializer("c", array(2, 4)),
        *bn_initializers("a", 4),
        *bn_initializers("b", 4, seed=7),
    ]
    onnx.save(make_model(nodes, [("X", ["N", 3])], ["Y"], inits), str(path))
    return path


def test_inspect_onnx_file_writes_nothing(tmp_path: Path) -> None:
    source = two_bn_model(tmp_path / "model.onnx")
    before = sorted(tmp_path.iterdir())
    report = inspect_path(source)
    assert sorted(tmp_path.iterdir()) == before
    assert report.kind == "onnx" and report.opset == 17
    assert report.batchnorm.total == 2
    assert [(f.name, f.into, f.direction) for f in report.batchnorm.folded] == [
        ("a", "gemm", "forward")
    ]
    assert [k.name for k in report.batchnorm.kept] == ["b"]
    assert report.batchnorm.kept[0].reason == (
        "forward: its input comes from Relu, not Conv/ConvTranspose/Gemm/MatMul; "
        "backward: the BN output is a graph output"
    )
    assert report.node_counts_before == {"BatchNormalization": 2, "Gemm": 1, "Relu": 1}
    assert report.node_counts_after == {"Gemm": 1, "Relu": 1, "BatchNormalization": 1}


def test_inspect_package_reads_its_manifest(tmp_path: Path) -> None:
    source = two_bn_model(tmp_path / "model.onnx")
    result = convert_onnx_file(
        source, repository=tmp_path / "repo", name="two", version=None, sample=None
    )
    report = inspect_path(Path(result.package_path))
    assert report.kind == "package"
    assert report.batchnorm == result.batchnorm
    assert report.node_counts_before == {"BatchNormalization": 2, "Gemm": 1, "Relu": 1}
    assert report.node_counts_after == {"Gemm": 1, "Relu": 1, "BatchNormalization": 1}


def test_cli_inspect_prints_the_table_and_json(tmp_path: Path) -> None:
    source = two_bn_model(tmp_path / "model.onnx")
    table = runner.invoke(app, ["inspect", str(source)])
    assert table.exit_code == 0, table.output
    assert "1 of 2 BatchNorms folds" in table.output
    assert "kept" in table.output and "Relu" in table.output
    as_json = runner.invoke(app, ["inspect", str(source), "--json"])
    assert as_json.exit_code == 0, as_json.output
    parsed = json.loads(as_json.output)
    assert parsed["batchnorm"]["total"] == 2
    assert parsed["node_counts"]["after"]["BatchNormalization"] == 1


def test_cli_inspect_bad_paths_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    for path, message in (
        (garbage, "is not an ONNX model"),
        (tmp_path / "absent.onnx", "no such file"),
        (tmp_path, "is not a package"),
    ):
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output


def test_cli_convert_onnx_source(tmp_path: Path) -> None:
    source = two_bn_model(tmp_path / "model.onnx")
    result = runner.invoke(app, ["convert", str(source), "-r", str(tmp_path / "repo"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["source_kind"] == "onnx" and report["package"].endswith("model/1")
    assert (tmp_path / "repo" / "model" / "1" / "manifest.json").is_file()


def test_cli_convert_onnx_source_with_progress_and_table(tmp_path: Path) -> None:
    source = two_bn_model(tmp_path / "model.onnx")
    result = runner.invoke(app, ["convert", str(source), "-r", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert "1 of 2 BatchNorms folded" in result.output
    assert "wrote" in result.output
