"""Writing one model package atomically: REPO/NAME/VERSION/.

The package is built in a hidden staging directory inside REPO (same file
system, so the final `os.rename` is atomic) and only renamed into place once
every file is written, hashed and synced. A crash or Ctrl-C leaves at most a
hidden `.NAME.VERSION.tmp-*` directory, which readers ignore and the next
write to that repository removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bnfold.convert.errors import PackageError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STAGING_PREFIX = "."


def check_model_name(name: str) -> str:
    """Refuse names that are not one safe path component (no `..`, `/`, NUL...)."""
    if not _NAME_PATTERN.match(name) or ".." in name:
        raise PackageError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def existing_versions(repository: Path, name: str) -> list[int]:
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(repository: Path, name: str) -> int:
    versions = existing_versions(repository, name)
    return versions[-1] + 1 if versions else 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StagedPackage:
    """A package under construction: write files into `directory`, then `commit`."""

    repository: Path
    name: str
    version: int
    directory: Path

    @property
    def final_path(self) -> Path:
        return self.repository / self.name / str(self.version)

    def commit(self, manifest: Mapping[str, object]) -> Path:
        """Hash the files, write the manifest, sync and rename into place."""
        files = {
            path.name: sha256_file(path)
            for path in sorted(self.directory.iterdir())
            if path.is_file() and path.name != MANIFEST
        }
        full_manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "files": files,
        }
        (self.directory / MANIFEST).write_text(json.dumps(full_manifest, indent=2) + "\n")
        for path in self.directory.iterdir():
            _fsync_path(path)
        _fsync_path(self.directory)
        target = self.final_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise PackageError(f"{target} already exists; choose another --version")
        os.rename(self.directory, target)
        _fsync_path(target.parent)
        return target


@contextmanager
def staged_package(repository: Path, name: str, version: int | None) -> Iterator[StagedPackage]:
    """Yield a staging area; anything that escapes the block removes it."""
    check_model_name(name)
    repository.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(repository)
    chosen = next_version(repository, name) if version is None else version
    if chosen < 1:
        raise PackageError(f"version must be a positive integer, got {chosen}")
    if (repository / name / str(chosen)).exists():
        raise PackageError(
            f"{repository / name / str(chosen)} already exists; choose another --version"
        )
    prefix = f"{_STAGING_PREFIX}{name}.{chosen}.tmp-{os.getpid()}-"
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=repository))
    try:
        yield StagedPackage(repository, name, chosen, directory)
    finally:
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)


def _remove_stale_staging(repository: Path) -> None:
    """Remove staging directories whose writing process is gone (a killed conversion).

    A concurrent conversion's staging directory is left alone: its pid is alive.
    """
    for path in repository.glob(f"{_STAGING_PREFIX}*.tmp-*-*"):
        owner = path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if path.is_dir() and owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
