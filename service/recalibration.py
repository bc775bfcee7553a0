"""Recalibrate a served model and roll forward, while it keeps serving.

`POST /v2/repository/models/{m}/recalibrate` lands here with the calibration
inputs already decoded (from the request, or the live-input reservoir of the
drift monitor). The work is `bnfold recalibrate`'s library
(`bnfold.convert.recalibration`, torch-free): it writes the new version
atomically beside the old one (killed half-way, it leaves no version). Then the
registry loads that one version beside the others (`load_version`): requests
already holding the old version finish on it, and the version policy decides
what unversioned requests hit from then on (`latest`: the new version, a roll
forward; rolling back is unloading it).

Inference never waits for this: the estimate, the re-fold, the verification
and the session opening run in a worker thread with a bounded number of
onnxruntime threads (`Settings.recalibration_threads`), and one model has at
most one recalibration at a time (a second one is refused with 409 rather than
queued: two would race for the same next version). No web framework here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.convert.errors import (
    CalibrationDataError,
    ConvertError,
    NotRecalibratable,
    PackageNotFound,
)
from bnfold.package_format import parse_version
from bnfold.service.errors import BadRequest, Conflict, NotFound, Unprocessable
from bnfold.service.registry import ModelRegistry
from bnfold.service.repository import relative_to_repository

if TYPE_CHECKING:
    from bnfold.convert.recalibration.pipeline import RecalibrationRequest

logger = logging.getLogger("bnfold.service")

METHODS = ("sequential", "batch")
#: Where the calibration inputs come from when the request carries none.
RESERVOIR = "reservoir"

#: The live inputs kept for `name` version `version`, or None when the reservoir is off.
ReservoirReader = Callable[[str, int], Mapping[str, np.ndarray] | None]


@dataclass(frozen=True)
class RecalibrationOptions:
    """The request's choices: which version to start from (None: the one unversioned requests
    hit), the method, and the library's sample cap and chunk size."""

    version: int | None = None
    method: str = "sequential"
    max_samples: int | None = None
    batch_size: int | None = None

    @classmethod
    def parse(cls, parameters: Mapping[str, Any]) -> RecalibrationOptions:
        """From the JSON `parameters` object or the query string (strings then)."""
        known = {"version", "method", "max_samples", "batch_size", "source"}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise BadRequest(
                f"unknown recalibrate parameter(s) {', '.join(unknown)}: "
                f"use {', '.join(sorted(known))}"
            )
        method = parameters.get("method", "sequential")
        if method not in METHODS:
            raise BadRequest(f"'method' must be one of {', '.join(METHODS)}, got {method!r}")
        return cls(
            version=_version(parameters.get("version")),
            method=method,
            max_samples=_positive(parameters, "max_samples"),
            batch_size=_positive(parameters, "batch_size"),
        )


def _version(value: object) -> int | None:
    if value is None:
        return None
    number = parse_version(str(value)) if isinstance(value, str | int) else None
    if number is None or isinstance(value, bool):
        raise BadRequest(f"'version' must be a model version (a positive integer), got {value!r}")
    return number


def _positive(parameters: Mapping[str, Any], key: str) -> int | None:
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"'{key}' must be a positive integer, got {value!r}")
    return value


class Recalibrations:
    """The recalibrate action of one app: at most one running per model."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        threads: int | None,
        reservoir: ReservoirReader | None = None,
        on_loaded: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.threads = threads
        self.reservoir = reservoir
        self.on_loaded = on_loaded
        self._running: set[str] = set()

    def running(self, name: str) -> bool:
        return name in self._running

    async def run(
        self,
        name: str,
        options: RecalibrationOptions,
        inputs: np.ndarray | Mapping[str, np.ndarray] | None,
        label: str,
    ) -> dict[str, Any]:
        """Recalibrate `name` on `inputs` (one array for a one-input model, arrays by input
        name, or None: the reservoir), load the new version, and answer with the library's
        report plus what is served now."""
        if not self.registry.knows(name):
            raise NotFound(f"unknown model {name!r}")
        # checked and claimed without an await in between: the event loop is the lock
        if name in self._running:
            raise Conflict(
                f"a recalibration of {name!r} is already running; retry when it has finished"
            )
        self._running.add(name)
        try:
            version = options.version or self.registry.get(name).version
            if inputs is None:
                inputs, label = self._reservoir_inputs(name, version), "live inputs (reservoir)"
            # imported here: the pipeline brings onnx (7 MB resident) that serving never uses
            from bnfold.convert.recalibration.pipeline import RecalibrationRequest

            request = RecalibrationRequest(
                repository=self.registry.repository,
                name=name,
                data=inputs if isinstance(inputs, np.ndarray) else dict(inputs),
                version=version,
                method=options.method,  # type: ignore[arg-type]
                max_samples=options.max_samples,
                batch_size=options.batch_size,
                threads=self.threads,
                data_label=label,
            )
            logger.info(
                "recalibrating %s version %d (%s, %s)", name, version, options.method, label
            )
            result = await asyncio.to_thread(self._recalibrate, request)
            entry = await asyncio.to_thread(self.registry.load_version, name, result.version)
        finally:
            self._running.discard(name)
        if self.on_loaded is not None:
            self.on_loaded(name)
        logger.info(
            "%s version %d written and loaded (from version %d, %d samples, %.2f s)",
            name,
            entry.version,
            result.from_version,
            result.samples,
            result.seconds,
        )
        report = result.as_dict()
        # relative to the repository, whatever path the server was started with: where the
        # server keeps its files is nobody else's business
        report["package_path"] = f"{name}/{result.version}"
        return {
            "model_name": name,
            "from_version": str(result.from_version),
            "model_version": str(result.version),
            "state": entry.state.value,
            "default_version": _text(self.registry.default_version(name)),
            "version_policy": self.registry.version_policy,
            "recalibration": report,
        }

    def _reservoir_inputs(self, name: str, version: int) -> Mapping[str, np.ndarray]:
        kept = None if self.reservoir is None else self.reservoir(name, version)
        if kept is None:
            raise Conflict(
                "the live-input reservoir is off, so there is nothing to recalibrate on: send "
                "the calibration inputs in the request (V2 tensors or a .npy body), or start "
                "the server with --drift-reservoir-samples N"
            )
        if not kept or next(iter(kept.values())).shape[0] == 0:
            raise Conflict(
                f"the live-input reservoir holds no inputs of {name!r} version {version} yet"
            )
        return kept

    def _recalibrate(self, request: RecalibrationRequest) -> Any:
        from bnfold.convert.recalibration.pipeline import recalibrate

        repository = self.registry.repository
        try:
            return recalibrate(request)
        except CalibrationDataError as exc:
            raise Unprocessable(relative_to_repository(str(exc), repository)) from None
        except PackageNotFound as exc:
            raise NotFound(relative_to_repository(str(exc), repository)) from None
        except (NotRecalibratable, ConvertError) as exc:
            raise Conflict(relative_to_repository(str(exc), repository)) from None
        except OSError as exc:
            raise Conflict(
                "cannot write the new version into the repository: "
                + relative_to_repository(f"{exc.strerror or exc}: {exc.filename or ''}", repository)
            ) from None


def _text(version: int | None) -> str | None:
    return None if version is None else str(version)
