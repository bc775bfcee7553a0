"""The served models: every package version with its state, and the loaded sessions.

One `ModelRegistry` per app (kept on the app, never global). Loading is
blocking work (hashing, session creation): callers run it off the event loop.
Reads happen on the event loop while a load may be running in a thread, so the
table is never mutated in place: a load builds a new table and swaps it in
under a lock, and a reader always sees one consistent table. A request that
already holds a model keeps its sessions alive after an unload or reload.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from bnfold.package_format import parse_version
from bnfold.service.batch_policy import BatchPolicy
from bnfold.service.errors import NotFound, PackageError, Unavailable
from bnfold.service.repository import PackageLocation, read_package, scan_repository
from bnfold.service.sessions import LoadedModel, SessionConfig, load_model

logger = logging.getLogger("bnfold.service")

UNLOADED = "unloaded by an admin request"


class ModelState(str, Enum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    state: ModelState
    reason: str
    model: LoadedModel | None = None


Table = dict[str, dict[int, ModelVersion]]


def relative_to_repository(reason: str, repository: Path) -> str:
    """`reason` with the repository's absolute path left out: the index is unauthenticated,
    and where the server keeps its files is nobody else's business."""
    for root in sorted({str(repository.absolute()), str(repository.resolve())}, key=len)[::-1]:
        reason = reason.replace(root + os.sep, "").replace(root, ".")
    return reason


def _load_version(
    location: PackageLocation, config: SessionConfig, batching_defaults: BatchPolicy
) -> ModelVersion:
    try:
        model = load_model(read_package(location), config, batching_defaults)
    except Exception as exc:  # one package, whatever is wrong with it, never stops the rest
        if not isinstance(exc, PackageError):
            logger.exception("loading %s version %d failed", location.name, location.version)
        message = exc.message if isinstance(exc, PackageError) else f"cannot be loaded: {exc}"
        reason = relative_to_repository(message, location.repository or location.path.parent.parent)
        logger.warning("%s version %d unavailable: %s", location.name, location.version, reason)
        return ModelVersion(location.name, location.version, ModelState.UNAVAILABLE, reason)
    logger.info(
        "loaded %s version %d in %.2f s on %s",
        model.name,
        model.version,
        model.load_seconds,
        ", ".join(model.providers),
    )
    return ModelVersion(model.name, model.version, ModelState.READY, "", model)


class ModelRegistry:
    def __init__(
        self,
        repository: Path,
        config: SessionConfig,
        batching_defaults: BatchPolicy = BatchPolicy(),
    ) -> None:
        self.repository = repository
        self.config = config
        self.batching_defaults = batching_defaults
        self._table: Table = {}
        self._lock = threading.Lock()

    def _load_locations(self, locations: list[PackageLocation]) -> Table:
        table: Table = {}
        for location in locations:
            table.setdefault(location.name, {})[location.version] = _load_version(
                location, self.config, self.batching_defaults
            )
        return table

    def load_all(self) -> list[ModelVersion]:
        """Scan the repository and (re)load every package. Blocking."""
        with self._lock:
            self._table = self._load_locations(scan_repository(self.repository))
            return self.index()

    def load(self, name: str) -> list[ModelVersion]:
        """(Re)load every version of `name` from disk: new versions appear, removed ones go.

        Raises `NotFound` when the repository has no such model directory (a model
        deleted from disk is dropped from the table), and
        `Unavailable` with the reasons when no version of it could be loaded.
        """
        with self._lock:
            locations = [
                location for location in scan_repository(self.repository) if location.name == name
            ]
            if not locations:
                # gone from disk: stop serving what memory still holds of it
                self._table = {key: value for key, value in self._table.items() if key != name}
                raise NotFound(f"the repository has no model {name!r}")
            versions = self._load_locations(locations)[name]
            self._table = {**self._table, name: versions}
        ready = [entry for entry in versions.values() if entry.state is ModelState.READY]
        if not ready:
            raise Unavailable(f"model {name!r} could not be loaded: {_reasons(versions)}")
        return list(versions.values())

    def unload(self, name: str) -> None:
        """Stop serving every version of `name`; it stays in the index as unloaded."""
        with self._lock:
            versions = self._table.get(name)
            if versions is None:
                raise NotFound(f"unknown model {name!r}")
            self._table = {
                **self._table,
                name: {
                    version: ModelVersion(name, version, ModelState.UNAVAILABLE, UNLOADED)
                    for version in versions
                },
            }
        logger.info("unloaded %s", name)

    def knows(self, name: str) -> bool:
        return name in self._table

    def index(self) -> list[ModelVersion]:
        table = self._table
        return [table[name][version] for name in sorted(table) for version in sorted(table[name])]

    def ready_versions(self, name: str) -> list[int]:
        return sorted(
            version
            for version, entry in self._versions(name).items()
            if entry.state is ModelState.READY
        )

    def _versions(self, name: str) -> dict[int, ModelVersion]:
        versions = self._table.get(name)
        if versions is None:
            raise NotFound(f"unknown model {name!r}")
        return versions

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model to serve: `version` if given, else the highest ready version."""
        versions = self._versions(name)
        if version is None:
            ready = [entry.model for entry in versions.values() if entry.model is not None]
            if not ready:
                raise Unavailable(f"model {name!r} is not ready: {_reasons(versions)}")
            return max(ready, key=lambda model: model.version)
        number = parse_version(version)
        entry = None if number is None else versions.get(number)
        if entry is None:
            known = ", ".join(str(number) for number in sorted(versions))
            raise NotFound(f"model {name!r} has no version {version!r} (versions: {known})")
        if entry.model is None:
            raise Unavailable(
                f"model {name!r} version {entry.version} is not ready: {entry.reason}"
            )
        return entry.model


def _reasons(versions: dict[int, ModelVersion]) -> str:
    return "; ".join(f"version {number}: {versions[number].reason}" for number in sorted(versions))
