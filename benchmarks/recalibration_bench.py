"""Recalibration benchmark: does `bnfold recalibrate` win back what a covariate shift costs?

For each built-in digits model, under each shift (benchmarks/recalibration/shifts.py),
measures, in one run on one machine:
  * held-out accuracy of the package's model.onnx, clean and shifted;
  * after `bnfold recalibrate` (both methods) on 64 / 256 / all unlabeled shifted
    training images, against torch.optim.swa_utils.update_bn on the same samples;
  * ResNet-18's recalibration time on 512 inputs, both methods;
  * the drift endpoint's verdict before and after recalibrating and rolling forward.
Writes its section of BENCHMARKS.md (tables and numbers only: what they mean is
written by hand below the section) and benchmarks/recalibration_bench.png.

    python benchmarks/recalibration_bench.py [--models digits_mlp] [--samples 64 all]
    python benchmarks/recalibration_bench.py --report-only   # re-render the last run
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bnfold.models.registry import BUILTIN_MODELS

from recalibration.drift import drift_rows
from recalibration.packages import WORK, build_repository, recalibrate_available
from recalibration.report import draw_plot, write_report
from recalibration.results import METHODS, RecalibrationResults, read_results, save_results
from recalibration.runs import TORCH_THREADS, accuracy_rows, resnet18_timings
from recalibration.shifts import SHIFTS
from report_section import describe_machine

PACKAGES = ("onnxruntime", "torch", "numpy")
RESULTS = WORK / "results.json"
DIGITS_MODELS = [name for name, spec in BUILTIN_MODELS.items() if spec.in_default_repository]


def _sample_count(text: str) -> int | None:
    return None if text == "all" else int(text)


def measure(arguments: argparse.Namespace) -> RecalibrationResults:
    """One run: convert, measure accuracy, time ResNet-18, read the drift endpoint."""
    started = time.perf_counter()
    machine = describe_machine(PACKAGES)
    load_start = os.getloadavg()[0]
    sample_counts = [_sample_count(text) for text in arguments.samples]
    with_bnfold = recalibrate_available()
    missing = (
        []
        if with_bnfold
        else ["every bnfold column: this checkout's bnfold has no `recalibrate` command"]
    )
    repository = WORK / "repository"
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        converting = progress.add_task("converting the built-ins", total=None)
        build_repository(repository, resnet18=not arguments.skip_resnet)
        progress.remove_task(converting)
        rows_total = len(arguments.models) * len(SHIFTS) * len(sample_counts)
        task = progress.add_task(
            "accuracy", total=rows_total * (len(METHODS) if with_bnfold else 1)
        )
        rows = accuracy_rows(
            repository,
            arguments.models,
            sample_counts,
            arguments.batch_size,
            progress,
            task,
            with_bnfold=with_bnfold,
            jobs=arguments.jobs,
        )
        timings, anchor_timings = [], []
        if not arguments.skip_resnet:
            task = progress.add_task("resnet18", total=len(METHODS) * with_bnfold + 1)
            timings, anchor_timings = resnet18_timings(
                repository,
                arguments.resnet_samples,
                arguments.batch_size,
                progress,
                task,
                with_bnfold=with_bnfold,
            )
        drift = []
        if arguments.skip_drift:
            missing.append("the drift endpoint (--skip-drift)")
        else:
            drift, problem = drift_rows(
                repository,
                arguments.models,
                arguments.batch_size,
                progress,
                roll_forward=with_bnfold,
            )
            if problem:
                missing.append(problem)
            elif not with_bnfold:
                missing.append("the drift verdicts after recalibrating (no `recalibrate`)")
    load_end = os.getloadavg()[0]
    return RecalibrationResults(
        rows=rows,
        timings=timings,
        anchor_timings=anchor_timings,
        drift=drift,
        missing=missing,
        run={
            "command": shlex.join(["python", "benchmarks/recalibration_bench.py", *sys.argv[1:]]),
            "batch_size": arguments.batch_size,
            "jobs": arguments.jobs,
            "torch_threads": TORCH_THREADS,
            "minutes": (time.perf_counter() - started) / 60,
            "load_start": load_start,
            "load_end": load_end,
        },
        machine=machine,
        shifts={shift.name: shift.description for shift in SHIFTS},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DIGITS_MODELS, choices=DIGITS_MODELS)
    parser.add_argument(
        "--samples", nargs="+", default=["64", "256", "all"], help="calibration sizes, or all"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--jobs", type=int, default=2, help="digits recalibrations run at once (not timed)"
    )
    parser.add_argument("--resnet-samples", type=int, default=512)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write BENCHMARKS.md and the plot again from the last run's results.json",
    )
    arguments = parser.parse_args()
    if arguments.report_only:
        results = read_results(RESULTS)
        draw_plot(results)
        write_report(results)
        return

    results = measure(arguments)
    save_results(results, RESULTS)
    draw_plot(results)
    write_report(results)


if __name__ == "__main__":
    main()
