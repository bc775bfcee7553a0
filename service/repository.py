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

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bnfold.package_format import (
    EVAL_GRAPH,
    MANIFEST,
    MODEL_CONFIG,
    TRAIN_GRAPH,
    Manifest,
    ManifestError,
    ModelConfig,
    is_version_name,
    parse_manifest,
    parse_model_config,
    sha256_bytes,
)
from bnfold.service.errors import PackageError

logger = logging.getLogger("bnfold.service")


def relative_to_repository(reason: str, repository: Path) -> str:
    """`reason` with the repository's absolute path left out: the index is unauthenticated,
    and where the server keeps its files is nobody else's business."""
    for root in sorted({str(repository.absolute()), str(repository.resolve())}, key=len)[::-1]:
        reason = reason.replace(root + os.sep, "").replace(root, ".")
    return reason


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


def _inside(root: Path, path: Path, what: str) -> Path:
    """`path` with symlinks resolved, refused unless it stays inside `root` (resolved)."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # a loop, a permission, a NUL byte
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
        try:
            version_dirs = list(os.scandir(model_dir.path))
        except OSError as exc:  # unreadable: the other models still serve
            logger.warning("ignoring model directory %s: %s", model_dir.name, exc.strerror)
            continue
        for version_dir in version_dirs:
            if not version_dir.is_dir():
                continue
            if is_version_name(version_dir.name):
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
    """The package directory, resolved: REPO/NAME/VERSION, two levels inside the repository
    (a version that links to the repository itself, or elsewhere, is refused)."""
    what = f"{location.name}/{location.version}"
    try:
        real = _inside(location.root, location.path, what)
    except FileNotFoundError:
        raise PackageError("the package directory is gone") from None
    if len(real.relative_to(location.root).parts) != 2:
        raise PackageError(f"{what} resolves to a directory that is not REPO/NAME/VERSION")
    return real


def _read_inside(directory: Path, file_name: str, what: str) -> bytes:
    """A regular file of `directory` (resolved), refused when a symlink takes it outside.

    Opened without following a last-moment symlink and without blocking (a FIFO would
    hang the load), and read only when it is a regular file.
    """
    real = _inside(directory, directory / file_name, what)
    try:
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise PackageError(f"{what} cannot be read: {exc.strerror}") from None
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise PackageError(f"{what} is a directory")
        if not stat.S_ISREG(mode):
            raise PackageError(f"{what} is not a regular file")
        try:
            return handle.read()
        except OSError as exc:
            raise PackageError(f"{what} cannot be read: {exc.strerror}") from None


def read_manifest(location: PackageLocation) -> Manifest:
    try:
        raw = _read_inside(_package_dir(location), MANIFEST, MANIFEST)
    except FileNotFoundError:
        raise PackageError(f"{MANIFEST} is missing") from None
    try:
        manifest = parse_manifest(raw)
    except ManifestError as exc:
        raise PackageError(str(exc)) from None
    if manifest.name != location.name or manifest.version != location.version:
        raise PackageError(
            f"{MANIFEST} describes {manifest.name} version {manifest.version}, "
            f"but the package sits at {location.name}/{location.version}"
        )
    return manifest


def read_model_config(location: PackageLocation) -> ModelConfig:
    """REPO/NAME/config.json, or the empty config when the file does not exist."""
    model_dir = _package_dir(location).parent
    try:
        raw = _read_inside(model_dir, MODEL_CONFIG, f"{location.name}/{MODEL_CONFIG}")
    except FileNotFoundError:
        return ModelConfig()
    try:
        return parse_model_config(raw, f"{location.name}/{MODEL_CONFIG}")
    except ManifestError as exc:
        raise PackageError(str(exc)) from None


def _read_hashed(package_dir: Path, file_name: str, expected: str) -> bytes:
    if Path(file_name).name != file_name or file_name in {".", ".."}:
        raise PackageError(f"{MANIFEST} lists {file_name!r}, which is not a file of the package")
    try:
        content = _read_inside(package_dir, file_name, file_name)
    except FileNotFoundError:
        raise PackageError(f"{file_name} is listed in {MANIFEST} but missing") from None
    actual = sha256_bytes(content)
    if actual != expected.lower():
        raise PackageError(
            f"sha256 of {file_name} is {actual[:12]}…, the manifest says {expected[:12]}…: "
            "the file was changed or corrupted after conversion"
        )
    return content


def read_verified_file(location: PackageLocation, manifest: Manifest, file_name: str) -> bytes:
    """One file of a loaded package, read again and checked against the sha256 of the
    manifest it was loaded with (not the manifest on disk now, which may have changed)."""
    expected = manifest.files.get(file_name)
    if expected is None:
        raise PackageError(f"{MANIFEST} lists no {file_name}")
    return _read_hashed(_package_dir(location), file_name, expected)


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
