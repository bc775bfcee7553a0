"""Writing one model package atomically: REPO/NAME/VERSION/.

The package is built in a hidden staging directory inside REPO (same file
system, so the final `os.rename` is atomic) and only renamed into place once
every file is written, hashed and synced. A crash or Ctrl-C leaves at most a
hidden `.NAME.VERSION.tmp-*` directory, which readers ignore and the next
write to that repository removes.

Only what the service can serve is written: VERSION is an integer from 1 to
2**63 − 1 (the service's rule when it scans), and directories and files get
the modes the umask gives any other file, so whoever may read the repository
may serve the package (a `tempfile.mkdtemp` directory would be 0700).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from bnfold.convert.errors import PackageError
from bnfold.package_format import (
    MANIFEST,
    MAX_VERSION,
    SCHEMA_VERSION,
    Manifest,
    is_version_name,
    sha256_file,
    version_problem,
)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STAGING_PREFIX = "."
_STAGING_ATTEMPTS = 100


def check_model_name(name: str) -> str:
    """Refuse names that are not one safe path component (no `..`, `/`, NUL...)."""
    if not _NAME_PATTERN.match(name) or ".." in name:
        raise PackageError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: int) -> int:
    """Refuse a version the service cannot serve (the package format's rule)."""
    problem = version_problem(version)
    if problem:
        raise PackageError(problem)
    return version


def existing_versions(repository: Path, name: str) -> list[int]:
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    return sorted(
        int(path.name)
        for path in model_dir.iterdir()
        if path.is_dir() and is_version_name(path.name)
    )


def next_version(repository: Path, name: str) -> int:
    versions = existing_versions(repository, name)
    if versions and versions[-1] == MAX_VERSION:
        raise PackageError(
            f"{repository / name} already has version {MAX_VERSION}, the largest there is; "
            "choose a free --version"
        )
    return versions[-1] + 1 if versions else 1


def check_repository(repository: Path) -> None:
    """Refuse a repository path that is, or lies below, something other than a directory.

    Only the nearest existing path is looked at and nothing is created, so the
    CLI can call this before any work and a typo costs no conversion.
    """
    existing = next(
        (path for path in (repository, *repository.parents) if path.exists() or path.is_symlink()),
        None,
    )
    if existing is not None and not existing.is_dir():
        where = "is" if existing == repository else f"lies below {existing}, which is"
        raise PackageError(
            f"cannot use {repository} as a model repository: it {where} not a directory"
        )


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

    def commit(self, fields: Mapping[str, object]) -> Path:
        """Hash the files, write the manifest, sync and rename into place.

        The manifest is built as the `Manifest` model the service reads it with,
        so a package the service would refuse fails here, before it exists.
        """
        files = {
            path.name: sha256_file(path)
            for path in sorted(self.directory.iterdir())
            if path.is_file() and path.name != MANIFEST
        }
        try:
            manifest = Manifest(
                schema_version=SCHEMA_VERSION,
                name=self.name,
                version=self.version,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **fields,
                files=files,
            )
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise PackageError(
                f"the manifest would not follow the package format: {where}: {first['msg']}"
            ) from error
        target = self.final_path
        try:
            (self.directory / MANIFEST).write_bytes(manifest.to_json())
            for path in self.directory.iterdir():
                _fsync_path(path)
            _fsync_path(self.directory)
            _make_directory(target.parent)
            # Claim the name first: mkdir fails if another conversion got there, while a
            # rename alone would silently replace an empty directory of the same name.
            os.mkdir(target)
            try:
                os.rename(self.directory, target)
            except OSError:
                target.rmdir()
                raise
            _fsync_path(target.parent)
        except FileExistsError:
            raise PackageError(f"{target} already exists; choose another --version") from None
        except OSError as error:
            raise PackageError(f"cannot write {target}: {error.strerror or error}") from error
        return target


@contextmanager
def staged_package(repository: Path, name: str, version: int | None) -> Iterator[StagedPackage]:
    """Yield a staging area; anything that escapes the block removes it.

    Name, version and repository are checked before anything is created.
    """
    check_model_name(name)
    if version is not None:
        check_version(version)
    check_repository(repository)
    _make_directory(repository)
    model_dir = repository / name
    if model_dir.exists() and not model_dir.is_dir():
        raise PackageError(f"cannot write packages of {name!r}: {model_dir} is not a directory")
    _remove_stale_staging(repository)
    chosen = next_version(repository, name) if version is None else version
    if (model_dir / str(chosen)).exists():
        raise PackageError(f"{model_dir / str(chosen)} already exists; choose another --version")
    directory = _make_staging_directory(repository, f"{_STAGING_PREFIX}{name}.{chosen}")
    try:
        yield StagedPackage(repository, name, chosen, directory)
    finally:
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)


def _make_directory(path: Path) -> None:
    """mkdir -p with the umask's mode; an OS refusal is a PackageError, not a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PackageError(f"cannot create {path}: {error.strerror or error}") from error


def _make_staging_directory(repository: Path, stem: str) -> Path:
    """A fresh `<stem>.tmp-<pid>-<random>` directory, mode 0o777 less the umask.

    Unlike `tempfile.mkdtemp` (always 0700), the package renamed from it is as
    readable as any other directory the user creates.
    """
    for _ in range(_STAGING_ATTEMPTS):
        directory = repository / f"{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            directory.mkdir(mode=0o777)
        except FileExistsError:
            continue
        except OSError as error:
            raise PackageError(f"cannot create {directory}: {error.strerror or error}") from error
        return directory
    raise PackageError(f"cannot create a staging directory in {repository}")


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
