"""`bnfold recalibrate` as a user runs it: output, --json, exit codes, nothing written on
bad input, and no torch in the process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.package_format import CALIBRATION_GRAPH

from convert_helpers import calibrated, convert_module
from onnx_helpers import array, initializer, make_model

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository: `mlp` (two BatchNorm1d), `plain` (no BatchNorm) and `old` (`mlp` as a
    schema 1 package: no calibration.onnx), version 1 each."""
    repository = tmp_path_factory.mktemp("cli") / "repository"
    torch.manual_seed(4)
    mlp = nn.Sequential(
        nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 6), nn.BatchNorm1d(6)
    )
    convert_module(calibrated(mlp, (16, 8)), (1, 8), repository, name="mlp")
    plain = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [("x", ["batch", 8])],
        ["y"],
        [initializer("w", array(1, 8, 2))],
    )
    onnx.save(plain, str(repository.parent / "plain.onnx"))
    convert_onnx_file(
        repository.parent / "plain.onnx",
        repository=repository,
        name="plain",
        version=1,
        sample=None,
    )
    old = repository / "old" / "1"
    shutil.copytree(repository / "mlp" / "1", old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"][CALIBRATION_GRAPH]
    manifest.update(name="old", schema_version=1)
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / CALIBRATION_GRAPH).unlink()
    return repository


@pytest.fixture
def repository(packages: Path, tmp_path: Path) -> Path:
    """A copy for one test to write into."""
    return Path(shutil.copytree(packages, tmp_path / "repository"))


def shifted_inputs(samples: int = 40) -> np.ndarray:
    return (np.random.default_rng(9).standard_normal((samples, 8)) * 0.5 + 2.0).astype(np.float32)


def listing(root: Path) -> list[str]:
    """Every path below `root`, hidden staging directories included."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_json_reports_the_new_version_and_its_drift(repository: Path, tmp_path: Path) -> None:
    data = shifted_inputs()
    np.save(tmp_path / "x.npy", data)
    result = runner.invoke(
        app,
        ["recalibrate", str(repository / "mlp"), "--data", str(tmp_path / "x.npy"), "--json"],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["name"], answer["from_version"], answer["version"]) == ("mlp", 1, 2)
    assert answer["package_path"] == str(repository / "mlp" / "2")
    assert (answer["method"], answer["samples"], answer["passes"]) == ("sequential", 40, 2)
    assert answer["data_sha256"] == hashlib.sha256(data.tobytes()).hexdigest()
    assert answer["data"] == str(tmp_path / "x.npy")
    assert answer["verification"]["passed"] is True
    layers = answer["layers"]
    assert {layer["name"] for layer in layers} == {"1", "4"}
    kl_before = [layer["before"]["kl_divergence"]["mean"] for layer in layers]
    assert kl_before == sorted(kl_before, reverse=True) and min(kl_before) > 0.01
    # After: only the running variance's n/(n-1) against the data's biased variance is
    # left, a KL of about 1/(4n²) = 1.6e-4 for n = 40 values per channel.
    assert all(layer["after"]["kl_divergence"]["mean"] < 2e-4 for layer in layers)
    manifest = json.loads((repository / "mlp" / "2" / "manifest.json").read_text())
    assert manifest["recalibrations"][0]["data_sha256"] == answer["data_sha256"]


def test_options_max_samples_method_batch_size_and_new_version(
    repository: Path, tmp_path: Path
) -> None:
    np.savez(tmp_path / "x.npz", anything=shifted_inputs(100))
    result = runner.invoke(
        app,
        [
            "recalibrate",
            str(repository / "mlp"),
            "--data",
            str(tmp_path / "x.npz"),
            "--max-samples",
            "30",
            "--method",
            "batch",
            "--batch-size",
            "8",
            "--new-version",
            "10",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["samples"], answer["method"], answer["batch_size"]) == (30, "batch", 8)
    assert answer["version"] == 10 and (repository / "mlp" / "10" / "manifest.json").is_file()


NO_TORCH = """
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not allowed here")
        return None

sys.meta_path.insert(0, NoTorch())
from bnfold.cli import app

try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def test_the_command_runs_without_torch_and_shows_progress(
    repository: Path, tmp_path: Path
) -> None:
    """A fresh interpreter in which importing torch fails; rich draws its progress bar
    because FORCE_COLOR makes stderr a terminal to it. REPO/NAME/VERSION names the version."""
    directory = tmp_path / "data"
    directory.mkdir()
    data = shifted_inputs(60)
    np.save(directory / "part1.npy", data[:25])
    np.save(directory / "part2.npy", data[25:])
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_TORCH,
            "recalibrate",
            str(repository / "mlp" / "1"),
            "--data",
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "160"},
    )
    *printed, last = process.stdout.strip().splitlines()
    report = json.loads(last)
    assert report == {"code": 0, "torch": []}, process.stderr
    output = ANSI.sub("", "\n".join(printed))
    assert "KL before" in output and "mlp v1 → v2: sequential on 60 samples" in output
    assert f"wrote {repository / 'mlp' / '2'}" in output.replace("\n", "")
    assert "recalibrating" in process.stderr and "━" in process.stderr  # the bar
    manifest = json.loads((repository / "mlp" / "2" / "manifest.json").read_text())
    assert (
        manifest["recalibrations"][0]["data_sha256"] == hashlib.sha256(data.tobytes()).hexdigest()
    )


BAD_INPUTS = {
    "float64 data": (["--data", "{x64}"], "input input is float64, the model takes float32"),
    "wrong shape": (["--data", "{wide}"], "axis 1 must be 8"),
    "NaN": (["--data", "{nan}"], "holds NaN or Inf (first in sample 3)"),
    "one sample": (["--data", "{one}"], "sees 1 value per channel in 1 sample"),
    "unreadable file": (["--data", "{broken}"], "cannot read data"),
    "missing file": (["--data", "{missing}"], "no such file or directory"),
    "empty directory": (["--data", "{empty}"], "holds no .npy or .npz files"),
    "chunk of one": (
        ["--data", "{good}", "--method", "batch", "--batch-size", "1"],
        "use a --batch-size of at least 2",
    ),
    "unknown method": (["--data", "{good}", "--method", "precise"], "unknown method 'precise'"),
    "bad max samples": (["--data", "{good}", "--max-samples", "0"], "--max-samples must be"),
    "unknown version": (["--data", "{good}", "--version", "5"], "mlp has no version 5"),
    "version taken": (["--data", "{good}", "--new-version", "1"], "already exists"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    repository: Path, tmp_path: Path, case: str
) -> None:
    files = _data_files(tmp_path)
    arguments, message = BAD_INPUTS[case]
    _assert_refused(repository, "mlp", [part.format(**files) for part in arguments], message)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("plain", "plain version 1 has no BatchNorm layers with running statistics"),
        ("old", "old version 1 has no calibration.onnx (package schema 1)"),
        ("unknown", "no model 'unknown' in repository"),
    ],
)
def test_packages_that_cannot_be_recalibrated_exit_2(
    repository: Path, tmp_path: Path, model: str, message: str
) -> None:
    files = _data_files(tmp_path)
    _assert_refused(repository, model, ["--data", files["good"]], message)


def _tamper(package: Path) -> None:
    content = bytearray((package / "model.onnx").read_bytes())
    content[-1] ^= 0xFF
    (package / "model.onnx").write_bytes(bytes(content))


def _symlink_out(package: Path) -> None:
    """calibration.onnx replaced by a link to an identical file outside the package."""
    outside = package.parent.parent.parent / "calibration-elsewhere.onnx"
    (package / CALIBRATION_GRAPH).rename(outside)
    (package / CALIBRATION_GRAPH).symlink_to(outside)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_tamper, "sha256 of model.onnx is"),
        (_symlink_out, "calibration.onnx resolves outside"),
    ],
)
def test_a_package_that_fails_verification_is_refused(
    repository: Path, tmp_path: Path, change: Callable[[Path], None], message: str
) -> None:
    """Only verified bytes are used: a changed file, or one read through a symlink that
    leaves the package (its bytes unchanged), is refused before anything runs."""
    change(repository / "mlp" / "1")
    _assert_refused(repository, "mlp", ["--data", _data_files(tmp_path)["good"]], message)


def _assert_refused(repository: Path, model: str, arguments: list[str], message: str) -> None:
    before = listing(repository)
    result = runner.invoke(app, ["recalibrate", str(repository / model), *arguments])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert listing(repository) == before


def _data_files(directory: Path) -> dict[str, str]:
    good = shifted_inputs()
    nan = good.copy()
    nan[3, 2] = np.nan
    arrays = {
        "good": good,
        "x64": good.astype(np.float64),
        "wide": np.zeros((40, 7), np.float32),
        "nan": nan,
        "one": good[:1],
    }
    files = {}
    for name, values in arrays.items():
        np.save(directory / f"{name}.npy", values)
        files[name] = str(directory / f"{name}.npy")
    (directory / "broken.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (directory / "empty").mkdir()
    files.update(
        broken=str(directory / "broken.npy"),
        missing=str(directory / "missing.npy"),
        empty=str(directory / "empty"),
    )
    return files
