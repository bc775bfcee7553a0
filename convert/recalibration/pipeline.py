"""`recalibrate`: one package version in, a recalibrated, re-folded, verified version out.

    read      the source package, every file's sha256 verified (`source_package`);
              the calibration data, checked against its inputs (`data`)
    measure   calibration.onnx over the data with the package's statistics: "before"
    estimate  the new running statistics (`statistics`: sequential or batch)
    check     (batch only) calibration.onnx with the new statistics: "after"
    fold .. write   the conversion skeleton on the unfolded graph (`refold`)
    -> RecalibrationResult

The library behind `bnfold recalibrate` and the service's recalibrate endpoint,
which calls it from a worker thread: no global state, nothing printed, scratch
files in a private temporary directory removed on the way out, and any error
leaves the repository as it was (no new version, no staging directory).
Errors are `RecalibrationError`s (bad data, unknown package, package that cannot
be recalibrated) or the conversion's own `ConvertError`s (version taken,
verification failed).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.bn_statistics import drift_measures
from bnfold.convert.errors import CalibrationDataError, PackageError
from bnfold.convert.package import check_model_name, check_version
from bnfold.convert.recalibration.data import CalibrationSource, calibration_data
from bnfold.convert.recalibration.refold import write_recalibrated
from bnfold.convert.recalibration.source_package import SourcePackage, read_source_package
from bnfold.convert.recalibration.statistics import (
    DEFAULT_BATCH_SIZE,
    METHODS,
    LayerEstimate,
    Method,
    RunProgress,
    SessionFactory,
    chunk_feeds,
    estimate,
    no_run_progress,
)
from bnfold.package_format import (
    CALIBRATION_GRAPH,
    ManifestLayer,
    ManifestTensor,
    Recalibration,
    Source,
)

#: Progress steps, in order; `check` runs for the batch method only.
STEPS = ("read", "measure", "estimate", "check", "fold", "export", "verify", "write")


@dataclass(frozen=True)
class RecalibrationRequest:
    """What to recalibrate and how.

    `data` is a path (.npy, .npz or a directory of them), one array (one-input
    models) or arrays by input name; `data_label` is what the manifest records
    as the data (default: the path, or "in-memory arrays"). `version` None takes
    the newest version, `new_version` None the next free one. `batch_size` None
    is `DEFAULT_BATCH_SIZE` (or the model's fixed batch size). `threads` caps
    onnxruntime's intra-op threads (None: its default, all cores).
    """

    repository: Path
    name: str
    data: CalibrationSource
    version: int | None = None
    method: Method = "sequential"
    max_samples: int | None = None
    batch_size: int | None = None
    new_version: int | None = None
    threads: int | None = None
    data_label: str | None = None


@dataclass(frozen=True)
class LayerDrift:
    """One BN layer: the calibration data's input statistics against the running statistics,
    before (the source package) and after (the new package); `drift_measures` blocks."""

    name: str
    channels: int
    depth: int
    before: dict[str, Any]
    after: dict[str, Any]


@dataclass(frozen=True)
class RecalibrationResult:
    """What a recalibration wrote: `layers` worst first by the KL divergence before."""

    name: str
    from_version: int
    version: int
    package_path: str
    method: Method
    samples: int
    batch_size: int
    data_sha256: str
    data: str
    passes: int
    seconds: float
    layers: list[LayerDrift] = field(default_factory=list)
    verification: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def recalibrate(
    request: RecalibrationRequest, step: RunProgress = no_run_progress
) -> RecalibrationResult:
    """Recalibrate one package version into a new one; raises ConvertError subclasses."""
    started = time.perf_counter()
    _check_options(request)
    step("read")
    with tempfile.TemporaryDirectory(prefix="bnfold-recalibrate-") as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "package").mkdir()
        source = read_source_package(
            request.repository, request.name, request.version, scratch / "package"
        )
        manifest = source.manifest
        data = calibration_data(
            request.data,
            manifest.inputs,
            max_samples=request.max_samples,
            description=request.data_label,
        )
        batch_size = _batch_size(request.batch_size, manifest.inputs, data.samples)
        calibration = source.calibration_graph()
        layers = manifest.batchnorm.layers
        estimated = estimate(
            calibration,
            source.train_graph,
            [layer.name for layer in layers],
            chunk_feeds(data.arrays, batch_size),
            method=request.method,
            sessions=SessionFactory(request.threads, scratch),
            progress=step,
        )
        statistics = {
            name: (
                layer.running_mean.astype(np.float32),
                layer.running_var.astype(np.float32),
            )
            for name, layer in estimated.layers.items()
        }
        provenance = Recalibration(
            from_version=source.version,
            method=request.method,
            samples=data.samples,
            data_sha256=data.sha256,
            data=data.description,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        written = write_recalibrated(
            calibration,
            statistics,
            repository=request.repository,
            name=request.name,
            version=request.new_version,
            source=_source(source),
            recalibrations=[*manifest.recalibrations, provenance],
            data=data.arrays,
            scratch=scratch,
            step=step,
        )
    drifts = [
        _layer_drift(layer, estimated.layers[layer.name], statistics[layer.name])
        for layer in layers
    ]
    drifts.sort(key=lambda drift: drift.before["kl_divergence"]["mean"], reverse=True)
    return RecalibrationResult(
        name=request.name,
        from_version=source.version,
        version=written.version,
        package_path=written.package_path,
        method=request.method,
        samples=data.samples,
        batch_size=batch_size,
        data_sha256=data.sha256,
        data=data.description,
        passes=estimated.passes,
        seconds=round(time.perf_counter() - started, 3),
        layers=drifts,
        verification=written.verification,
    )


def _check_options(request: RecalibrationRequest) -> None:
    """Refuse bad options before any work; a taken --new-version too."""
    if request.method not in METHODS:
        raise CalibrationDataError(f"unknown method {request.method!r}; use {' or '.join(METHODS)}")
    if request.batch_size is not None and request.batch_size < 1:
        raise CalibrationDataError(f"--batch-size must be at least 1, got {request.batch_size}")
    if request.threads is not None and request.threads < 1:
        raise CalibrationDataError(f"threads must be at least 1, got {request.threads}")
    if request.new_version is not None:
        check_version(request.new_version)
        check_model_name(request.name)
        target = request.repository / request.name / str(request.new_version)
        if target.exists():
            raise PackageError(f"{target} already exists; choose another --new-version")


def _batch_size(requested: int | None, inputs: tuple[ManifestTensor, ...], samples: int) -> int:
    """The chunk size: the model's fixed batch size if it has one (then the samples must
    fill whole batches), else the requested or default size."""
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] > 0}
    if not fixed:
        return requested or DEFAULT_BATCH_SIZE
    size = min(fixed)
    if requested not in (None, size):
        raise CalibrationDataError(
            f"the model takes batches of exactly {size} samples: use --batch-size {size}"
        )
    if samples % size:
        raise CalibrationDataError(
            f"the model takes batches of exactly {size} samples; {samples} samples do not "
            f"fill whole batches: give a multiple of {size}"
        )
    return size


def _source(package: SourcePackage) -> Source:
    """The original package's provenance; a package without one is named by its own graph."""
    if package.manifest.source is not None:
        return package.manifest.source
    return Source(
        kind="onnx",
        ref=str(package.path / CALIBRATION_GRAPH),
        sha256=package.manifest.files[CALIBRATION_GRAPH],
    )


def _layer_drift(
    layer: ManifestLayer, estimated: LayerEstimate, new: tuple[np.ndarray, np.ndarray]
) -> LayerDrift:
    before = drift_measures(
        layer.running_mean,
        layer.running_var,
        layer.eps,
        estimated.before.mean,
        estimated.before.variance(),
    )
    after = drift_measures(
        new[0], new[1], layer.eps, estimated.after.mean, estimated.after.variance()
    )
    return LayerDrift(layer.name, layer.channels, estimated.depth, before, after)
