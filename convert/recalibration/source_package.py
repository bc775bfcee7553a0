"""The package a recalibration starts from: found in the repository, every file verified.

The service's reader (`bnfold.service.repository.read_package`) does the
reading, so a recalibration trusts exactly what serving trusts: the manifest
parsed, every listed file's bytes matching its sha256, nothing read through a
symlink that leaves the package. Only those verified bytes are used; they are
written to a private scratch directory for onnx to load (external data
included), never read again from the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import ModelProto

from bnfold.convert.errors import NotRecalibratable, PackageNotFound, first_line
from bnfold.convert.package import check_model_name, existing_versions
from bnfold.package_format import CALIBRATION_GRAPH, TRAIN_GRAPH, Manifest
from bnfold.service.errors import PackageError as UnreadablePackage
from bnfold.service.repository import PackageLocation, read_package


@dataclass(frozen=True)
class SourcePackage:
    """A verified package whose graphs were copied into `scratch` (which the caller owns)."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    scratch: Path

    def calibration_graph(self) -> ModelProto:
        return _load(self.scratch / CALIBRATION_GRAPH)

    def train_graph(self) -> ModelProto:
        return _load(self.scratch / TRAIN_GRAPH)


def read_source_package(
    repository: Path, name: str, version: int | None, scratch: Path
) -> SourcePackage:
    """REPO/NAME/VERSION (the newest version when None), verified and copied into `scratch`.

    Raises PackageNotFound for an unknown model or version and NotRecalibratable
    for a package that fails verification, predates calibration.onnx (schema 1)
    or has no BatchNorm layers.
    """
    check_model_name(name)
    versions = existing_versions(repository, name)
    if not versions:
        raise PackageNotFound(f"no model {name!r} in repository {repository}")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        listed = ", ".join(map(str, versions))
        raise PackageNotFound(f"{name} has no version {chosen}; it has {listed}")
    location = PackageLocation(name, chosen, repository / name / str(chosen), repository)
    try:
        package = read_package(location)
    except UnreadablePackage as error:
        raise NotRecalibratable(f"{name} version {chosen} cannot be read: {error}") from None
    manifest = package.manifest
    if not manifest.has_calibration_graph:
        raise NotRecalibratable(
            f"{name} version {chosen} has no {CALIBRATION_GRAPH} (package schema "
            f"{manifest.schema_version}): convert the model again with this bnfold to recalibrate"
        )
    if not manifest.batchnorm.layers:
        raise NotRecalibratable(
            f"{name} version {chosen} has no BatchNorm layers with running statistics: "
            "nothing to recalibrate"
        )
    for file_name, content in package.contents.items():
        (scratch / file_name).write_bytes(content)
    return SourcePackage(name, chosen, location.path, manifest, scratch)


def _load(path: Path) -> ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as error:
        raise NotRecalibratable(f"cannot load {path.name}: {first_line(error)}") from error
