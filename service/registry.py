"""The served models: every package version with its state, and the loaded sessions.

One `ModelRegistry` per app (kept on the app, never global). Loading is
blocking work (hashing, session creation): callers run it off the event loop.
Reads happen on the event loop while a load may be running in a thread, so the
table is never mutated in place: a load builds a new table and swaps it in
under a lock, and a reader always sees one consistent table. A request that
already holds a model keeps its sessions alive after an unload or reload, so
a request racing a roll-forward (a new version loaded) or a rollback (a version
unloaded) is answered by one version or the other, never by an error.

Which version an unversioned request hits is the version policy: `latest`
(the highest ready version: loading a recalibrated version rolls forward,
unloading it rolls back) or `specific` (REPO/NAME/config.json's
`default_version`, else the highest version ready when the model was loaded;
new versions are served only when asked for by number until the model is
reloaded).

A version is READY only after its warm-up (`sessions.warm_up`, unless
`SessionConfig.warmup` is off): a warm-up run that fails leaves it UNAVAILABLE
with the reason. `load(name, config)` takes Triton's config override
(`load_config`): it applies to every version of the model, those loaded later
by `load_version` too, until the next `load` of the model without one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from bnfold.package_format import ManifestError, parse_version
from bnfold.service.batch_policy import BatchPolicy
from bnfold.service.errors import NotFound, PackageError, Unavailable
from bnfold.service.heap import release_free_heap
from bnfold.service.load_config import ConfigOverride, parse_config_override
from bnfold.service.repository import (
    PackageLocation,
    read_model_config,
    read_package,
    relative_to_repository,
    scan_repository,
)
from bnfold.service.sessions import (
    LoadedModel,
    SessionConfig,
    load_model,
    warm_up,
    warmup_run_options,
)
from bnfold.service.warmup import describe_runs

logger = logging.getLogger("bnfold.service")

UNLOADED = "unloaded by an admin request"
LATEST = "latest"
SPECIFIC = "specific"


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


def _load_version(
    location: PackageLocation,
    config: SessionConfig,
    batching_defaults: BatchPolicy,
    override: ConfigOverride,
) -> ModelVersion:
    try:
        model = load_model(read_package(location), config, batching_defaults, override)
        if config.warmup:
            model = warm_up(model, config.warmup_max_bytes, warmup_run_options(config))
        if not config.resident_train_graph:
            model.train.release()  # opened, checked and warmed: compare reopens it (sessions.py)
    except Exception as exc:  # one package, whatever is wrong with it, never stops the rest
        if not isinstance(exc, PackageError):
            logger.exception("loading %s version %d failed", location.name, location.version)
        message = exc.message if isinstance(exc, PackageError) else f"cannot be loaded: {exc}"
        reason = relative_to_repository(message, location.repository or location.path.parent.parent)
        logger.warning("%s version %d unavailable: %s", location.name, location.version, reason)
        return ModelVersion(location.name, location.version, ModelState.UNAVAILABLE, reason)
    finally:
        release_free_heap()  # what parsing and optimising the graphs freed (sessions.py)
    logger.info(
        "loaded %s version %d in %.2f s on %s",
        model.name,
        model.version,
        model.load_seconds,
        ", ".join(model.providers),
    )
    if config.warmup:
        logger.info(
            "warmed up %s version %d in %.1f ms: %s",
            model.name,
            model.version,
            model.warmup_seconds * 1e3,
            describe_runs(model.warmup),
        )
    return ModelVersion(model.name, model.version, ModelState.READY, "", model)


class ModelRegistry:
    def __init__(
        self,
        repository: Path,
        config: SessionConfig,
        batching_defaults: BatchPolicy = BatchPolicy(),
        version_policy: str = LATEST,
    ) -> None:
        if version_policy not in (LATEST, SPECIFIC):
            raise ValueError(f"unknown version policy {version_policy!r}")
        self.repository = repository
        self.config = config
        self.batching_defaults = batching_defaults
        self.version_policy = version_policy
        self._table: Table = {}
        # under the `specific` policy: the version unversioned requests hit, per model
        self._pinned: dict[str, int] = {}
        # the newest ready version of each model, by the versions table it was found in: a
        # table is replaced, never changed, so the lookup on every request is one dict get
        self._newest: dict[str, tuple[dict[int, ModelVersion], LoadedModel]] = {}
        # the config override of the last load of each model that had one
        self._overrides: dict[str, ConfigOverride] = {}
        self._lock = threading.Lock()

    def _load_locations(self, locations: list[PackageLocation]) -> Table:
        table: Table = {}
        for location in locations:
            table.setdefault(location.name, {})[location.version] = _load_version(
                location,
                self.config,
                self.batching_defaults,
                self._overrides.get(location.name, ConfigOverride()),
            )
        return table

    def _pin(self, name: str, versions: dict[int, ModelVersion]) -> None:
        """Under `specific`: fix the default version of `name` (config.json, else the newest ready)."""
        if self.version_policy != SPECIFIC or not versions:
            return
        any_version = next(iter(versions.values()))
        location = PackageLocation(
            name,
            any_version.version,
            self.repository / name / str(any_version.version),
            self.repository,
        )
        try:
            configured = read_model_config(location).default_version
        except (ManifestError, PackageError, OSError) as exc:
            logger.warning(
                "%s: config.json unreadable, default version not configured: %s", name, exc
            )
            configured = None
        ready = [number for number, entry in versions.items() if entry.state is ModelState.READY]
        pinned = configured or (max(ready) if ready else None)
        if pinned is None:
            self._pinned.pop(name, None)
        else:
            self._pinned[name] = pinned
            logger.info(
                "%s: unversioned requests hit version %d (version policy specific)", name, pinned
            )

    def load_all(self) -> list[ModelVersion]:
        """Scan the repository and (re)load every package, without config overrides. Blocking."""
        with self._lock:
            self._overrides = {}
            self._table = self._load_locations(scan_repository(self.repository))
            for name, versions in self._table.items():
                self._pin(name, versions)
            return self.index()

    def load(self, name: str, config: Mapping[str, Any] | None = None) -> list[ModelVersion]:
        """(Re)load every version of `name` from disk: new versions appear, removed ones go.

        `config`: Triton's config override (`load_config`), kept for the model until
        its next load without one; None drops the one it had.

        Raises `BadRequest` for a config bnfold cannot honour (nothing is loaded),
        `NotFound` when the repository has no such model directory (a model
        deleted from disk is dropped from the table), and
        `Unavailable` with the reasons when no version of it could be loaded.
        """
        override = None if config is None else parse_config_override(config, name)
        with self._lock:
            locations = [
                location for location in scan_repository(self.repository) if location.name == name
            ]
            others = {key: value for key, value in self._overrides.items() if key != name}
            if not locations:
                # gone from disk: stop serving what memory still holds of it
                self._table = {key: value for key, value in self._table.items() if key != name}
                self._overrides = others
                raise NotFound(f"the repository has no model {name!r}")
            self._overrides = others if override is None else {**others, name: override}
            versions = self._load_locations(locations)[name]
            self._table = {**self._table, name: versions}
            self._pin(name, versions)
        ready = [entry for entry in versions.values() if entry.state is ModelState.READY]
        if not ready:
            raise Unavailable(f"model {name!r} could not be loaded: {_reasons(versions)}")
        return list(versions.values())

    def load_version(self, name: str, version: int) -> ModelVersion:
        """Load one version of `name` from disk beside the others (a roll forward under the
        `latest` policy); the other versions keep their sessions. Raises `NotFound` when
        the repository has no such package, `Unavailable` when it cannot be loaded."""
        location = next(
            (
                found
                for found in scan_repository(self.repository)
                if found.name == name and found.version == version
            ),
            None,
        )
        if location is None:
            raise NotFound(f"the repository has no version {version} of model {name!r}")
        override = self._overrides.get(name, ConfigOverride())
        entry = _load_version(location, self.config, self.batching_defaults, override)
        with self._lock:
            versions = {**self._table.get(name, {}), version: entry}
            self._table = {**self._table, name: versions}
            if name not in self._pinned:
                self._pin(name, versions)
        if entry.state is not ModelState.READY:
            raise Unavailable(
                f"model {name!r} version {version} could not be loaded: {entry.reason}"
            )
        return entry

    def unload_version(self, name: str, version: int) -> None:
        """Stop serving one version (a rollback when it is the newest); it stays in the index."""
        with self._lock:
            versions = self._versions(name)
            if version not in versions:
                raise NotFound(f"model {name!r} has no version {version}")
            self._table = {
                **self._table,
                name: {
                    **versions,
                    version: ModelVersion(name, version, ModelState.UNAVAILABLE, UNLOADED),
                },
            }
        logger.info("unloaded %s version %d", name, version)

    def default_version(self, name: str) -> int | None:
        """The version an unversioned request for `name` hits now, or None when none is ready."""
        try:
            return self.get(name).version
        except (NotFound, Unavailable):
            return None

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
        """The model to serve: `version` if given, else the one the version policy names."""
        versions = self._versions(name)
        if version is None:
            pinned = self._pinned.get(name) if self.version_policy == SPECIFIC else None
            if pinned is not None:
                entry = versions.get(pinned)
                if entry is None or entry.model is None:
                    why = "it is not in the repository" if entry is None else entry.reason
                    raise Unavailable(
                        f"model {name!r}: its default version {pinned} (version policy "
                        f"specific) is not ready: {why}"
                    )
                return entry.model
            newest = self._newest.get(name)
            if newest is not None and newest[0] is versions:
                return newest[1]
            ready = [entry.model for entry in versions.values() if entry.model is not None]
            if not ready:
                raise Unavailable(f"model {name!r} is not ready: {_reasons(versions)}")
            model = max(ready, key=lambda model: model.version)
            self._newest[name] = (versions, model)
            return model
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
