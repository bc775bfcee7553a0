"""The ONNX pattern families: typed, run in order, and counted per family in the report."""

from __future__ import annotations

import json
from pathlib import Path

from test_onnx_pipeline import cnn, mlp
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.convert.onnx.fold import BACKWARD, CONV_FORWARD, DENSE_FORWARD, FAMILIES
from bnfold.convert.onnx.inspect import inspect_path
from bnfold.convert.onnx.io import load_onnx_source
from bnfold.convert.onnx.pipeline import convert_onnx_file

from onnx_helpers import export


def test_families_run_forward_first_then_backward() -> None:
    assert FAMILIES == (CONV_FORWARD, DENSE_FORWARD, BACKWARD)
    assert [family.direction for family in FAMILIES] == ["forward", "forward", "backward"]
    assert len({family.name for family in FAMILIES}) == len(FAMILIES)


def test_the_report_counts_folds_per_family(tmp_path: Path) -> None:
    """cnn(): one Conv->BN (conv_forward) and one BN kept before a zero-padded conv;
    mlp(): Linear->BN (dense_forward) and BN->Dropout->Linear (backward)."""
    cases = {"cnn": (cnn(), (1, 2, 6, 6)), "mlp": (mlp(), (1, 6))}
    expected = {
        "cnn": {"conv_forward": 1, "dense_forward": 0, "backward": 0},
        "mlp": {"conv_forward": 0, "dense_forward": 1, "backward": 1},
    }
    for name, (module, shape) in cases.items():
        source = export(module, tmp_path / f"{name}.onnx", shape)
        result = convert_onnx_file(
            source, repository=tmp_path / "repo", name=name, version=None, sample=None
        )
        counts = result.batchnorm.by_pattern
        assert counts == expected[name]
        assert sum(counts.values()) == len(result.batchnorm.folded)
        manifest = json.loads((Path(result.package_path) / "manifest.json").read_text())
        assert manifest["batchnorm"]["by_pattern"] == expected[name]
        assert inspect_path(source).batchnorm.by_pattern == expected[name]
        load_onnx_source(source)  # the source is untouched by the in-memory folds


def test_the_cli_table_shows_the_counts(tmp_path: Path) -> None:
    source = export(mlp(), tmp_path / "mlp.onnx", (1, 6))
    result = CliRunner().invoke(app, ["inspect", str(source)])
    assert result.exit_code == 0, result.output
    assert "by pattern: conv_forward 0, dense_forward 1, backward 1" in result.output
