"""Reading a model repository: find the packages, check each one's manifest and hashes.

Layout and contract: docs/package-format.md. `scan_repository` lists
REPO/NAME/VERSION directories (never dot-directories: those are the
converter's staging areas) and `read_package` returns a `VerifiedPackage` whose
graph bytes are exactly the bytes that were hashed, so nothing can change
between the check and the session that loads them. Any problem is a
`PackageError` whose message is the reason shown in the repository index.

Model names come from the directory listing only; a name from a request is
never joined to a path. Nothing outside the repository is read: a package,
model directory or file that resolves (symlinks followed) outside it is a
`PackageError`, and so is a graph whose external data is not one of its
package's hashed files (`external_data`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bnfold.service.errors import PackageError
from bnfold.service.protocol import Datatype

MANIFEST = "manifest.json"
MODEL_CONFIG = "config.json"
EVAL_GRAPH = "model.onnx"
TRAIN_GRAPH = "train.onnx"

logger = logging.getLogger("bnfold.service")


class ManifestTensor(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...]

    @model_validator(mode="after")
    def _dims(self) -> ManifestTensor:
        if any(dim < -1 for dim in self.shape):
            raise ValueError(f"tensor {self.name!r}: dims are -1 (dynamic) or >= 0")
        return self


class ManifestLayer(BaseModel):
    """One BatchNorm of the source model with its running statistics."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    channels: int = Field(gt=0)
    eps: float = Field(ge=0)
    channel_axis: int = 1
    input_rank: int | None = Field(None, ge=2)
    running_mean: tuple[float, ...]
    running_var: tuple[float, ...]
    batch_mean_output: str
    batch_var_output: str

    @model_validator(mode="after")
    def _statistics(self) -> ManifestLayer:
        if len(self.running_mean) != self.channels or len(self.running_var) != self.channels:
            raise ValueError(f"layer {self.name!r}: running statistics need {self.channels} values")
        if any(var < 0 for var in self.running_var):
            raise ValueError(f"layer {self.name!r}: negative running variance")
        return self


class ManifestBatchNorm(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    layers: tuple[ManifestLayer, ...] = ()


class BatchingFields(BaseModel):
    """Dynamic batching settings, as a package (manifest.json) or an operator (config.json) sets them.

    Every field is optional: one left out falls through to the next source
    (REPO/NAME/config.json, then the manifest, then the server's settings).
    Unknown fields are errors, so a typo never silently leaves the defaults on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=0)
    max_queue_delay_us: int | None = Field(None, ge=0, le=1_000_000)
    max_queue_size: int | None = Field(None, ge=1)


class ModelConfig(BaseModel):
    """REPO/NAME/config.json: the operator's settings for every version of NAME."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batching: BatchingFields = BatchingFields()


class Manifest(BaseModel):
    """The fields of manifest.json the service relies on; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: Literal[1]
    name: str
    version: int = Field(gt=0, le=2**63 - 1)
    inputs: tuple[ManifestTensor, ...] = Field(min_length=1)
    outputs: tuple[ManifestTensor, ...] = Field(min_length=1)
    batchnorm: ManifestBatchNorm = ManifestBatchNorm()
    batching: BatchingFields = BatchingFields()
    files: dict[str, str]


@dataclass(frozen=True, order=True)
class PackageLocation:
    """REPO/NAME/VERSION; `repository` is the root nothing may be read outside of
    (REPO, i.e. the package's grandparent, when not given)."""

    name: str
    version: int
    path: Path
    repository: Path | None = field(default=None, compare=False)

    @property
    def root(self) -> Path:
        return (self.repository or self.path.parent.parent).resolve()


@dataclass(frozen=True)
class VerifiedPackage:
    """A package whose manifest parsed and whose files' bytes match their sha256.

    `contents` holds every file the manifest lists, exactly the bytes that were
    hashed; `config` is the model directory's config.json (empty when there is none).
    """

    location: PackageLocation
    manifest: Manifest
    config: ModelConfig
    contents: dict[str, bytes]
    sha256: dict[str, str]

    @property
    def eval_graph(self) -> bytes:
        return self.contents[EVAL_GRAPH]

    @property
    def train_graph(self) -> bytes:
        return self.contents[TRAIN_GRAPH]


#: Versions are what Triton's clients can send: positive and within a signed 64-bit integer.
MAX_VERSION = 2**63 - 1


def parse_version(text: str) -> int | None:
    """The version `text` spells (ASCII digits, no sign, 1..MAX_VERSION), else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_VERSION)):
        return None
    number = int(text)
    return number if 1 <= number <= MAX_VERSION else None


def _is_version(name: str) -> bool:
    return parse_version(name) is not None and name == str(int(name))


def _inside(root: Path, path: Path, what: str) -> Path:
    """`path` with symlinks resolved, refused unless it stays inside `root` (resolved)."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission problem
        raise PackageError(f"{what} cannot be resolved: {exc}") from None
    if real != root and not real.is_relative_to(root):
        raise PackageError(f"{what} resolves outside the model repository; it is not read")
    return real


def scan_repository(repository: Path) -> list[PackageLocation]:
    """Every REPO/NAME/VERSION directory, sorted by name then version.

    Raises `FileNotFoundError` when the repository itself is missing: that is a
    configuration error, not a broken package.
    """
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} does not exist")
    found: list[PackageLocation] = []
    for model_dir in os.scandir(repository):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        for version_dir in os.scandir(model_dir.path):
            if not version_dir.is_dir():
                continue
            if _is_version(version_dir.name):
                found.append(
                    PackageLocation(
                        model_dir.name, int(version_dir.name), Path(version_dir.path), repository
                    )
                )
            elif not version_dir.name.startswith("."):
                logger.warning(
                    "ignoring %s/%s: a version is an integer from 1 to 2**63-1 without "
                    "leading zeros",
                    model_dir.name,
                    version_dir.name,
                )
    return sorted(found)


def _package_dir(location: PackageLocation) -> Path:
    """The package directory, resolved, refused when it lies outside the repository."""
    try:
        return _inside(location.root, location.path, f"{location.name}/{location.version}")
    except FileNotFoundError:
        raise PackageError("the package directory is gone") from None


def _read_inside(directory: Path, file_name: str, what: str) -> bytes:
    """A file of `directory` (resolved), refused when a symlink takes it outside."""
    try:
        return _inside(directory, directory / file_name, what).read_bytes()
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise PackageError(f"{what} is a directory") from None
    except OSError as exc:
        raise PackageError(f"{what} cannot be read: {exc.strerror}") from None


def read_manifest(location: PackageLocation) -> Manifest:
    try:
        raw = _read_inside(_package_dir(location), MANIFEST, MANIFEST)
    except FileNotFoundError:
        raise PackageError(f"{MANIFEST} is missing") from None
    try:
        manifest = Manifest.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise PackageError(f"{MANIFEST} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise PackageError(
            f"{MANIFEST} does not follow the package format: {_validation_reason(exc)}"
        ) from None
    if manifest.name != location.name or manifest.version != location.version:
        raise PackageError(
            f"{MANIFEST} describes {manifest.name} version {manifest.version}, "
            f"but the package sits at {location.name}/{location.version}"
        )
    return manifest


def _validation_reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}"


def read_model_config(location: PackageLocation) -> ModelConfig:
    """REPO/NAME/config.json, or the empty config when the file does not exist."""
    model_dir = _package_dir(location).parent
    try:
        raw = _read_inside(model_dir, MODEL_CONFIG, f"{location.name}/{MODEL_CONFIG}")
    except FileNotFoundError:
        return ModelConfig()
    try:
        return ModelConfig.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise PackageError(f"{location.name}/{MODEL_CONFIG} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise PackageError(
            f"{location.name}/{MODEL_CONFIG} is not a model configuration: "
            f"{_validation_reason(exc)}"
        ) from None


def _read_hashed(package_dir: Path, file_name: str, expected: str) -> bytes:
    if Path(file_name).name != file_name or file_name in {".", ".."}:
        raise PackageError(f"{MANIFEST} lists {file_name!r}, which is not a file of the package")
    try:
        content = _read_inside(package_dir, file_name, file_name)
    except FileNotFoundError:
        raise PackageError(f"{file_name} is listed in {MANIFEST} but missing") from None
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected.lower():
        raise PackageError(
            f"sha256 of {file_name} is {actual[:12]}…, the manifest says {expected[:12]}…: "
            "the file was changed or corrupted after conversion"
        )
    return content


def read_package(location: PackageLocation) -> VerifiedPackage:
    """Check the manifest and every file's sha256; keep the files' bytes; read config.json."""
    manifest = read_manifest(location)
    config = read_model_config(location)
    for required in (EVAL_GRAPH, TRAIN_GRAPH):
        if required not in manifest.files:
            raise PackageError(f"{MANIFEST} has no sha256 for {required}")
    package_dir = _package_dir(location)
    contents = {
        file_name: _read_hashed(package_dir, file_name, expected)
        for file_name, expected in manifest.files.items()
    }
    return VerifiedPackage(
        location=location,
        manifest=manifest,
        config=config,
        contents=contents,
        sha256={name: digest.lower() for name, digest in manifest.files.items()},
    )
