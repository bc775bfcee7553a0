"""What one recalibration run measured, and its results.json: the report reads nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from report_section import Machine

METHODS = ("sequential", "batch")


@dataclass
class AccuracyRow:
    """One model under one shift, recalibrated on `samples` unlabeled shifted training images.

    Accuracies are fractions of the `test_images` held-out images. `agreement` counts,
    per method, the held-out images on which bnfold's recalibrated model.onnx predicts
    the same class as the torch reference of that method (torch_reference)."""

    model: str
    shift: str
    samples: int
    test_images: int
    clean: float
    shifted: float
    anchor: float
    bnfold: dict[str, float]
    reference: dict[str, float]
    agreement: dict[str, int]
    seconds: dict[str, float]
    wall_seconds: dict[str, float]


@dataclass
class Timing:
    """The recalibration time of one model on `samples` inputs by one method."""

    model: str
    method: str
    samples: int
    batch_size: int
    seconds: float
    wall_seconds: float
    passes: int | None = None  # passes over the data, as bnfold reports them


@dataclass
class DriftVerdict:
    """The drift endpoint's answer for one served version after the same shifted traffic."""

    version: int
    status: str  # ok, drifted or insufficient_data
    samples_seen: int  # input rows measured in the window
    dropped: int  # sampled requests the monitor could not measure
    layers: int
    drifted: int
    worst_layer: str
    worst_kl: float
    worst_mean_shift: float
    served_accuracy: float


@dataclass
class DriftRow:
    model: str
    shift: str
    before: DriftVerdict
    after: DriftVerdict | None  # None for clean traffic: nothing to recalibrate


@dataclass
class RecalibrationResults:
    rows: list[AccuracyRow]
    timings: list[Timing]
    anchor_timings: list[Timing]  # torch update_bn on the same data, for scale
    drift: list[DriftRow]
    missing: list[str]  # what this run could not measure, and why
    run: dict[str, str | int | float]  # command, batch size, duration, load averages
    machine: Machine
    shifts: dict[str, str] = field(default_factory=dict)  # name -> description


def save_results(results: RecalibrationResults, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(results), indent=1))


def _verdict(saved: dict | None) -> DriftVerdict | None:
    return None if saved is None else DriftVerdict(**saved)


def read_results(path: Path) -> RecalibrationResults:
    saved = json.loads(path.read_text())
    return RecalibrationResults(
        rows=[AccuracyRow(**row) for row in saved["rows"]],
        timings=[Timing(**timing) for timing in saved["timings"]],
        anchor_timings=[Timing(**timing) for timing in saved["anchor_timings"]],
        drift=[
            DriftRow(row["model"], row["shift"], _verdict(row["before"]), _verdict(row["after"]))
            for row in saved["drift"]
        ],
        missing=saved["missing"],
        run=saved["run"],
        machine=Machine(**saved["machine"]),
        shifts=saved["shifts"],
    )
