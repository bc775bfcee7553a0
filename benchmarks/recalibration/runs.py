"""The measurements: accuracy under each shift before and after recalibration, and the
recalibration time of ResNet-18. Every bnfold number comes from a package on disk
written by `bnfold recalibrate`; every torch number from the original module."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from rich.progress import Progress, TaskID

from bnfold.models.data import digits_dataset
from bnfold.models.registry import builtin_model, load_builtin

from .packages import Recalibration, onnx_predictions, recalibrate, write_data
from .results import METHODS, AccuracyRow, Timing
from .shifts import SHIFTS, TEST_SEED, TRAIN_SEED, calibration_subset
from .torch_reference import exact_sequential, precise_batch, predictions, update_bn

TORCH_THREADS = 2


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted == labels).mean())


@dataclass
class _Pending:
    """A row whose bnfold columns wait for their `bnfold recalibrate` runs."""

    row: AccuracyRow
    data: Path
    test_inputs: npt.NDArray[np.float32]
    test_labels: npt.NDArray[np.int64]
    references: dict[str, npt.NDArray[np.int64]]


def accuracy_rows(
    repository: Path,
    models: list[str],
    sample_counts: list[int | None],
    batch_size: int,
    progress: Progress,
    task: TaskID,
    *,
    with_bnfold: bool,
    jobs: int,
) -> list[AccuracyRow]:
    """Every model x shift x calibration size; `None` in `sample_counts` means every
    training image. The torch side runs first, then the `bnfold recalibrate` runs,
    `jobs` at a time (their accuracy does not depend on how many run at once; their
    time is not reported). Without `with_bnfold` only the torch side is measured."""
    split = digits_dataset()
    torch.set_num_threads(TORCH_THREADS)
    pending: list[_Pending] = []
    for name in models:
        spec = builtin_model(name)
        module = load_builtin(name)
        original = repository / name / "1"
        labels = split.test_labels
        clean = _accuracy(onnx_predictions(original, spec.digits_inputs(split.test_inputs)), labels)
        for shift in SHIFTS:
            test_inputs = spec.digits_inputs(shift(split.test_inputs, TEST_SEED))
            shifted = _accuracy(onnx_predictions(original, test_inputs), labels)
            train_pixels = shift(split.train_inputs, TRAIN_SEED)
            for count in sample_counts:
                samples = len(train_pixels) if count is None else count
                progress.update(task, description=f"torch: {name}, {shift.name}, {samples}")
                inputs = spec.digits_inputs(calibration_subset(train_pixels, samples))
                references = {
                    "sequential": predictions(
                        exact_sequential(module, inputs, batch_size), test_inputs
                    ),
                    "batch": predictions(precise_batch(module, inputs, batch_size), test_inputs),
                }
                anchor = predictions(update_bn(module, inputs, batch_size), test_inputs)
                row = AccuracyRow(
                    model=name,
                    shift=shift.name,
                    samples=samples,
                    test_images=len(labels),
                    clean=clean,
                    shifted=shifted,
                    anchor=_accuracy(anchor, labels),
                    bnfold={},
                    reference={m: _accuracy(p, labels) for m, p in references.items()},
                    agreement={},
                    seconds={},
                    wall_seconds={},
                )
                data = write_data(f"{name}-{shift.name}-{samples}", inputs)
                pending.append(_Pending(row, data, test_inputs, labels, references))
                if not with_bnfold:
                    progress.advance(task)
    if with_bnfold:
        _recalibrate_all(repository, pending, batch_size, progress, task, jobs)
    return [entry.row for entry in pending]


def _recalibrate_all(
    repository: Path,
    pending: list[_Pending],
    batch_size: int,
    progress: Progress,
    task: TaskID,
    jobs: int,
) -> None:
    """Both methods for every pending row; each run writes its own version number, so
    runs on one model never race for the next one."""
    runs = [(entry, method) for entry in pending for method in METHODS]
    next_version: dict[str, int] = {}

    def numbered(entry: _Pending) -> int:
        next_version[entry.row.model] = next_version.get(entry.row.model, 1) + 1
        return next_version[entry.row.model]

    progress.update(task, description=f"bnfold recalibrate, {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            pool.submit(
                recalibrate,
                repository,
                entry.row.model,
                entry.data,
                method,
                batch_size,
                new_version=numbered(entry),
            ): (entry, method)
            for entry, method in runs
        }
        try:
            for future in as_completed(futures):
                entry, method = futures[future]
                _record(entry, method, future.result())
                progress.advance(task)
        except BaseException:
            for future in futures:  # a failed run (or Ctrl-C) stops the ones not started
                future.cancel()
            raise


def _record(entry: _Pending, method: str, run: Recalibration) -> None:
    row = entry.row
    if int(run.answer["samples"]) != row.samples:
        raise RuntimeError(
            f"{row.model}: bnfold used {run.answer['samples']} samples of {row.samples}"
        )
    predicted = onnx_predictions(run.package, entry.test_inputs)
    row.bnfold[method] = _accuracy(predicted, entry.test_labels)
    row.agreement[method] = int((predicted == entry.references[method]).sum())
    row.seconds[method] = run.seconds
    row.wall_seconds[method] = run.wall_seconds


def resnet18_timings(
    repository: Path,
    samples: int,
    batch_size: int,
    progress: Progress,
    task: TaskID,
    *,
    with_bnfold: bool,
) -> tuple[list[Timing], list[Timing]]:
    """bnfold's recalibration time for ResNet-18 (both methods, one after the other, nothing
    else of this run alongside) on `samples` random ImageNet-normalised inputs, and torch's
    update_bn on the same batches for scale."""
    spec = builtin_model("resnet18")
    shape = (samples, *spec.input_shape[1:])
    inputs = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    timings = []
    if with_bnfold:
        data = write_data(f"resnet18-random-{samples}", inputs)
        for method in METHODS:
            progress.update(task, description=f"resnet18: bnfold {method}, {samples} samples")
            run = recalibrate(repository, "resnet18", data, method, batch_size)
            passes = run.answer.get("passes")
            timings.append(
                Timing(
                    "resnet18",
                    method,
                    samples,
                    batch_size,
                    run.seconds,
                    run.wall_seconds,
                    None if passes is None else int(passes),
                )
            )
            progress.advance(task)
    progress.update(task, description=f"resnet18: torch update_bn, {samples} samples")
    torch.set_num_threads(TORCH_THREADS)
    module = load_builtin("resnet18")
    started = time.perf_counter()
    update_bn(module, inputs, batch_size)
    seconds = time.perf_counter() - started
    progress.advance(task)
    return timings, [
        Timing("resnet18", "torch update_bn", samples, batch_size, seconds, seconds, 1)
    ]
