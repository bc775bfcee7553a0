"""The recalibration section of BENCHMARKS.md and its plot, from one run's results only.

Only the text between the section's markers is written here; what the numbers mean
is written by hand below the section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .packages import ROOT
from .results import METHODS, AccuracyRow, DriftVerdict, RecalibrationResults
from report_section import replace_section

SECTION = "recalibration-bench"
PLOT = ROOT / "benchmarks" / "recalibration_bench.png"
#: Bar order and labels of the plot's accuracy panels.
VARIANTS = (
    ("clean", "clean"),
    ("shifted", "shifted"),
    ("anchor", "torch update_bn"),
    ("sequential", "bnfold sequential"),
    ("batch", "bnfold batch"),
)


def _images(row: AccuracyRow, accuracy: float) -> int:
    """Accuracies are fractions of the held-out images: compared as image counts."""
    return round(accuracy * row.test_images)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def _percent(accuracy: float | None) -> str:
    return "—" if accuracy is None else f"{accuracy * 100:.1f}"


def verdict(row: AccuracyRow) -> str:
    """≥ anchor: met when every method recovers at least as many images as update_bn."""
    if not row.bnfold:
        return "not measured"
    short = {
        method: _images(row, row.anchor) - _images(row, accuracy)
        for method, accuracy in row.bnfold.items()
    }
    missed = [
        f"{method} −{_count(images, 'image')}" for method, images in short.items() if images > 0
    ]
    return "met" if not missed else "missed: " + ", ".join(missed)


def _accuracy_table(rows: list[AccuracyRow]) -> list[str]:
    lines = [
        "| model | shift | samples | clean | shifted | torch update_bn (anchor) | "
        "bnfold sequential | bnfold batch | ≥ anchor | same prediction as the torch "
        "reference: sequential / batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        agreement = (
            " / ".join(f"{row.agreement[method]}/{row.test_images}" for method in METHODS)
            if row.agreement
            else "—"
        )
        lines.append(
            f"| {row.model} | {row.shift} | {row.samples} | {_percent(row.clean)} | "
            f"{_percent(row.shifted)} | {_percent(row.anchor)} | "
            f"{_percent(row.bnfold.get('sequential'))} | {_percent(row.bnfold.get('batch'))} | "
            f"{verdict(row)} | {agreement} |"
        )
    return lines


def _against_anchor(rows: list[AccuracyRow], method: str) -> str:
    """Rows where `method` beats, ties and trails the anchor, with the largest gaps."""
    gaps = [_images(row, row.bnfold[method]) - _images(row, row.anchor) for row in rows]
    better = [gap for gap in gaps if gap > 0]
    worse = [-gap for gap in gaps if gap < 0]
    text = f"{method}: better on {_count(len(better), 'row')}"
    if better:
        text += f" (by up to {_count(max(better), 'image')})"
    text += f", equal on {gaps.count(0)}, worse on {len(worse)}"
    if worse:
        text += f" (by up to {_count(max(worse), 'image')})"
    return text


def _summary(rows: list[AccuracyRow]) -> list[str]:
    measured = [row for row in rows if row.bnfold]
    if not measured:
        return ["bnfold was not measured in this run (see below)."]
    met = [row for row in measured if verdict(row) == "met"]
    agreed = sum(sum(row.agreement.values()) for row in measured)
    predictions = sum(row.test_images * len(row.agreement) for row in measured)
    lines = [
        f"Target (bnfold's recalibrated accuracy ≥ the anchor's, both methods): met on "
        f"{len(met)} of {len(measured)} rows. Against the anchor, "
        + "; ".join(_against_anchor(measured, method) for method in METHODS)
        + f". bnfold's packages predict what the torch reference of their method predicts "
        f"on {agreed} of {predictions} held-out predictions.",
    ]
    misses = [row for row in measured if row not in met]
    if misses:
        lines += ["", "Rows where it is not met:", ""]
        lines += [
            f"* {row.model}, {row.shift}, {row.samples} samples: {verdict(row)} "
            f"(anchor {_percent(row.anchor)} %; the torch reference of bnfold's methods: "
            + ", ".join(
                f"{m} {_percent(row.reference[m])} %, "
                f"same prediction on {row.agreement[m]}/{row.test_images}"
                for m in METHODS
            )
            + ")"
            for row in misses
        ]
    return lines


def _timing_table(results: RecalibrationResults) -> list[str]:
    lines = [
        "| model | method | samples | batch size | passes over the data | "
        "recalibration (s), as reported | whole command (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for timing in results.timings:
        lines.append(
            f"| {timing.model} | bnfold {timing.method} | {timing.samples} | "
            f"{timing.batch_size} | {timing.passes or '—'} | {timing.seconds:.1f} | "
            f"{timing.wall_seconds:.1f} |"
        )
    for timing in results.anchor_timings:
        lines.append(
            f"| {timing.model} | {timing.method} (torch, for scale) | {timing.samples} | "
            f"{timing.batch_size} | {timing.passes or '—'} | {timing.seconds:.1f} | — |"
        )
    return lines


def _drift_cells(verdict: DriftVerdict | None) -> str:
    if verdict is None:
        return "— | — | —"
    return (
        f"v{verdict.version}: {verdict.status}, {verdict.drifted}/{verdict.layers} layers "
        f"({verdict.samples_seen} rows{f', {verdict.dropped} dropped' if verdict.dropped else ''}) "
        f"| {verdict.worst_layer}: {verdict.worst_kl:.3g} ({verdict.worst_mean_shift:.2f}) "
        f"| {_percent(verdict.served_accuracy)}"
    )


def _drift_table(results: RecalibrationResults) -> list[str]:
    lines = [
        "| model | traffic | before: verdict | worst layer: mean KL (mean shift, σ) | "
        "served accuracy | after: verdict | worst layer: mean KL (mean shift, σ) | "
        "served accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(row.model for row in results.drift))
    kinds = ["clean", *results.shifts]
    ordered = sorted(results.drift, key=lambda r: (models.index(r.model), kinds.index(r.shift)))
    lines += [
        f"| {row.model} | {row.shift} | {_drift_cells(row.before)} | {_drift_cells(row.after)} |"
        for row in ordered
    ]
    return lines


def write_report(results: RecalibrationResults, plot: Path = PLOT) -> None:
    run = results.run
    machine = results.machine
    lines = [
        "## Recalibration: accuracy recovered under a covariate shift, from the package alone",
        "",
        machine.line(float(run["load_start"]), float(run["load_end"])),
        f"Command: `{run['command']}` ({run['minutes']:.1f} min). Every bnfold number comes "
        "from `bnfold recalibrate REPO/NAME --version 1 --data X.npy --method M --batch-size "
        f"{run['batch_size']} --json` run as a user runs it (a subprocess: package in, "
        "package out, no torch) and onnxruntime on the model.onnx it wrote; the anchor is "
        "`torch.optim.swa_utils.update_bn` on the original torch module, the same samples "
        f"in the same order, a DataLoader of batch size {run['batch_size']}. The digits "
        f"recalibrations ran {run.get('jobs', 1)} at a time (their times are not reported); "
        "ResNet-18's alone.",
        "",
        "### Accuracy",
        "",
        "The built-in digits models, converted by this checkout, version 1. Shifts (held-out "
        f"images for accuracy, {results.rows[0].test_images if results.rows else 0} of them; "
        "training images, labels unused, for recalibration; noise drawn independently):",
        "",
        *[f"* **{name}**: {description}" for name, description in results.shifts.items()],
        "",
        "Accuracy in %. *samples*: the unlabeled shifted training images recalibrated on, "
        "nested subsets of one fixed permutation. The last column counts the held-out images "
        "on which bnfold's recalibrated model.onnx predicts what an independent torch "
        "computation of the same method predicts (benchmarks/recalibration/torch_reference.py: "
        "forward hooks on the torch module, float64 sums): it tells an estimation method's "
        "effect from an error.",
        "",
        *_summary(results.rows),
        "",
        *_accuracy_table(results.rows),
        "",
        "### Recalibration time",
        "",
        "ResNet-18 (random weights, calibrated BNs: the `resnet18` built-in converted at its "
        "default input shape 1×3×224×224) on random N(0, 1) inputs. *As reported*: the "
        "`seconds` of `--json` (reading the package and the data, the passes, the re-fold, "
        "writing and verifying the new package); *whole command*: the process from start to "
        "exit (adds the interpreter's start and imports). torch update_bn on the same batches, "
        f"{run.get('torch_threads', 2)} threads, for scale.",
        "",
        *_timing_table(results),
        "",
        "### Drift endpoint before and after",
        "",
        "`bnfold serve` on a repository holding version 1 of each digits model, drift "
        "monitoring on every request (sample fraction 1.0); the shifted held-out images sent "
        "one per request; `GET /v2/models/{m}/versions/1/drift`; then `bnfold recalibrate` on "
        "every shifted training image (sequential) writes version 2 beside the running server, "
        "`POST /v2/repository/models/{m}/load` (admin token) rolls unversioned traffic forward, "
        "the same traffic again, and `GET …/versions/2/drift`. *Served accuracy*: the "
        "server's answers to that traffic.",
        "",
        *_drift_table(results),
    ]
    if results.missing:
        lines += ["", "Not measured in this run:", "", *[f"* {item}" for item in results.missing]]
    lines += ["", f"![recalibration benchmark]({plot.relative_to(ROOT)})"]
    replace_section(SECTION, "\n".join(lines))


def draw_plot(results: RecalibrationResults, plot: Path = PLOT) -> None:
    """Top: accuracy per shift with every training image; bottom: accuracy against the
    number of calibration samples. One column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(row.model for row in results.rows))
    shifts = list(results.shifts)
    figure, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7.5), squeeze=False)
    width = 0.8 / len(VARIANTS)
    for column, model in enumerate(models):
        rows = [row for row in results.rows if row.model == model]
        largest = {row.shift: row for row in rows if row.samples == max(r.samples for r in rows)}
        top = axes[0][column]
        for offset, (key, label) in enumerate(VARIANTS):
            values = [_value(largest[shift], key) for shift in shifts]
            top.bar(
                np.arange(len(shifts)) + (offset - (len(VARIANTS) - 1) / 2) * width,
                [np.nan if value is None else value * 100 for value in values],
                width,
                label=label,
            )
        top.set_xticks(np.arange(len(shifts)), shifts)
        top.set_ylim(0, 100)
        top.set_title(f"{model} ({largest[shifts[0]].samples} samples)")
        bottom = axes[1][column]
        for index, shift in enumerate(shifts):
            series = sorted((row for row in rows if row.shift == shift), key=lambda r: r.samples)
            counts = [row.samples for row in series]
            colour = f"C{index}"
            for key, style in (("anchor", ":"), ("sequential", "-"), ("batch", "--")):
                values = [_value(row, key) for row in series]
                if all(value is not None for value in values):
                    bottom.plot(counts, [v * 100 for v in values], style, color=colour, marker=".")
            bottom.axhline(series[0].shifted * 100, color=colour, linewidth=0.6, alpha=0.5)
        bottom.set_xscale("log")
        bottom.set_xlabel("calibration samples")
        bottom.set_title(f"{model}: accuracy vs samples")
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[1][0].set_ylabel("held-out accuracy (%)")
    bars, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(bars, labels, loc="upper center", ncol=len(VARIANTS), fontsize=8)
    lines = [Line2D([], [], color=f"C{i}", label=shift) for i, shift in enumerate(shifts)]
    lines += [
        Line2D([], [], color="grey", linestyle=style, label=label)
        for style, label in (
            (":", "torch update_bn"),
            ("-", "bnfold sequential"),
            ("--", "bnfold batch"),
        )
    ]
    lines.append(Line2D([], [], color="grey", linewidth=0.6, label="shifted, not recalibrated"))
    figure.legend(handles=lines, loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.07, 1, 0.96))
    figure.savefig(plot, dpi=100)
    plt.close(figure)


def _value(row: AccuracyRow, key: str) -> float | None:
    if key in METHODS:
        return row.bnfold.get(key)
    return getattr(row, key)
