"""Reading packages: the scan, the manifest and hash checks, sessions (their security:
reliability/test_package_security.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bnfold.service.errors import NotFound, PackageError, Unavailable
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.repository import (
    PackageLocation,
    read_package,
    scan_repository,
)
from bnfold.service.sessions import SessionConfig, load_model

from service_packages import write_dtypes, write_mlp

CPU_CONFIG = SessionConfig(providers=("CPUExecutionProvider",))


def _location(package: Path) -> PackageLocation:
    return PackageLocation(package.parent.name, int(package.name), package)


def _rewrite_manifest(package: Path, **changes: object) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    manifest.update(changes)
    (package / "manifest.json").write_text(json.dumps(manifest))


def test_scan_finds_versions_and_skips_staging_and_strays(tmp_path: Path) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    write_mlp(tmp_path, "mlp", 10, seed=2)
    (tmp_path / ".mlp.3.tmp-1-x").mkdir()
    (tmp_path / "mlp" / ".2.tmp").mkdir()
    (tmp_path / "mlp" / "01").mkdir()
    (tmp_path / "mlp" / "0").mkdir()
    (tmp_path / "mlp" / "latest").mkdir()
    (tmp_path / "README.md").write_text("not a model")
    assert [(found.name, found.version) for found in scan_repository(tmp_path)] == [
        ("mlp", 1),
        ("mlp", 10),
    ]


def test_scan_of_a_missing_repository_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan_repository(tmp_path / "nowhere")


def test_a_valid_package_reads_and_loads(tmp_path: Path) -> None:
    package = read_package(_location(write_mlp(tmp_path, "mlp", 1, seed=1)))
    model = load_model(package, CPU_CONFIG)
    assert model.providers == ("CPUExecutionProvider",)
    assert [layer.name for layer in model.layers] == ["bn1"]
    assert model.layers[0].input_rank == 2


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda p: _rewrite_manifest(p, schema_version=3), "schema_version"),
        (lambda p: _rewrite_manifest(p, schema_version=2), "packages list calibration.onnx"),
        (lambda p: _rewrite_manifest(p, inputs=[]), "inputs"),
        (lambda p: _rewrite_manifest(p, name="other"), "describes other version 1"),
        (
            lambda p: (p / "train.onnx").unlink(),
            "train.onnx is listed in manifest.json but missing",
        ),
        (lambda p: (p / "model.onnx").write_bytes(b"changed"), "sha256 of model.onnx"),
        (
            lambda p: _rewrite_manifest(p, files={"model.onnx": "0", "../escape": "0"}),
            "has no sha256 for train.onnx",
        ),
        (
            lambda p: _rewrite_manifest(
                p, files={**json.loads((p / "manifest.json").read_text())["files"], "../x": "0"}
            ),
            "not a file of the package",
        ),
    ],
)
def test_broken_packages_say_why(tmp_path: Path, damage, reason: str) -> None:
    package = write_mlp(tmp_path, "mlp", 1, seed=1)
    damage(package)
    with pytest.raises(PackageError, match=reason):
        read_package(_location(package))


def test_a_manifest_that_disagrees_with_the_graph_is_refused(tmp_path: Path) -> None:
    package = write_mlp(tmp_path, "mlp", 1, seed=1)
    _rewrite_manifest(package, inputs=[{"name": "input", "datatype": "FP64", "shape": [-1, 8]}])
    with pytest.raises(PackageError, match="is tensor\\(float\\) but the manifest says FP64"):
        load_model(read_package(_location(package)), CPU_CONFIG)
    _rewrite_manifest(package, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 9]}])
    with pytest.raises(PackageError, match="the manifest says \\[-1, 9\\]"):
        load_model(read_package(_location(package)), CPU_CONFIG)


def test_train_graph_must_expose_the_batch_statistics(tmp_path: Path) -> None:
    package = write_mlp(tmp_path, "mlp", 1, seed=1)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["batchnorm"]["layers"][0]["batch_var_output"] = "bn1.nowhere"
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="lacks the batch statistics outputs"):
        load_model(read_package(_location(package)), CPU_CONFIG)


def test_registry_serves_the_highest_ready_version_and_isolates_broken_ones(
    tmp_path: Path,
) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    write_mlp(tmp_path, "mlp", 2, seed=2)
    broken = write_mlp(tmp_path, "mlp", 3, seed=3)
    (broken / "train.onnx").write_bytes(b"")
    write_dtypes(tmp_path)
    registry = ModelRegistry(tmp_path, CPU_CONFIG)
    index = registry.load_all()
    states = {(entry.name, entry.version): entry.state for entry in index}
    assert states == {
        ("dtypes", 1): ModelState.READY,
        ("mlp", 1): ModelState.READY,
        ("mlp", 2): ModelState.READY,
        ("mlp", 3): ModelState.UNAVAILABLE,
    }
    assert "sha256 of train.onnx" in index[-1].reason
    assert registry.get("mlp").version == 2
    assert registry.get("mlp", "1").version == 1
    with pytest.raises(Unavailable, match="version 3 is not ready: sha256"):
        registry.get("mlp", "3")
    for missing_version in ("4", "x", "-1", "1.0", ""):
        with pytest.raises(NotFound, match="has no version"):
            registry.get("mlp", missing_version)
    for unknown in ("nope", "../mlp", "mlp/1", "\0", ".."):
        with pytest.raises(NotFound, match="unknown model"):
            registry.get(unknown)


def test_registry_reload_picks_up_new_versions_and_unload_keeps_the_entry(tmp_path: Path) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    registry = ModelRegistry(tmp_path, CPU_CONFIG)
    registry.load_all()
    write_mlp(tmp_path, "mlp", 2, seed=2)
    assert registry.get("mlp").version == 1
    registry.load("mlp")
    assert registry.get("mlp").version == 2
    registry.unload("mlp")
    with pytest.raises(Unavailable, match="unloaded"):
        registry.get("mlp")
    assert {entry.reason for entry in registry.index()} == {"unloaded by an admin request"}
    shutil.rmtree(tmp_path / "mlp")
    with pytest.raises(NotFound, match="no model 'mlp'"):
        registry.load("mlp")
    assert not registry.knows("mlp") and registry.index() == []
