"""Converter benchmark: conversion time and the served model's latency.

Measures, in one run on one machine, for the ImageNet-shaped built-ins:
  * conversion time of `bnfold convert` (trace, fold, two exports, verification
    of both graphs, package) against a plain `torch.onnx.export` of the same
    model, with the TorchScript exporter and with torch's default (dynamo);
  * onnxruntime latency (ORT_ENABLE_ALL, the threads given) of the folded
    model.onnx against the plain unfolded export (BatchNormalization nodes
    left for onnxruntime's own fusions) and against torch eval.
Writes its section of BENCHMARKS.md (tables and numbers only: what they mean
is written by hand below the section) and benchmarks/convert_bench.png.

    python benchmarks/convert_bench.py [--models resnet18 mobilenet_v2] [--repeats 5]
    python benchmarks/convert_bench.py --report-only   # re-render the last run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from rich.progress import Progress

from bnfold.convert.torch.pipeline import TorchConversionRequest, convert_torch
from bnfold.convert.torch.sources import load_source
from bnfold.models.registry import BUILTIN_MODELS

from report_section import Machine, describe_machine, replace_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "convert-bench"
PACKAGES = ("torch", "onnxruntime")
#: The last run's measurements, so the report can be re-rendered without measuring again.
RESULTS = ROOT / "benchmarks" / "out" / "convert" / "results.json"


def median_seconds(action, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def plain_export(module: torch.nn.Module, shape: tuple[int, ...], path: Path, dynamo: bool) -> None:
    example = torch.randn(*shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                input_names=["input"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
            )
        else:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=17,
                do_constant_folding=False,
            )


def ort_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_model(
    name: str, repeats: int, threads: int, workdir: Path, progress: Progress, task
) -> dict:
    spec = BUILTIN_MODELS[name]
    loaded = load_source(name, weights=None, trust_pickle=False)
    module = copy.deepcopy(loaded.module).eval()
    shape = tuple(spec.input_shape)
    row: dict = {"model": name}

    counter = iter(range(1, 10_000))
    stage_samples: dict[str, list[float]] = {}

    def convert_once() -> None:
        # The pipeline announces each stage; the time until the next
        # announcement (or the end) is that stage's share.
        marks: list[tuple[str, float]] = []
        convert_torch(
            TorchConversionRequest(
                loaded=loaded, repository=workdir / "repo", version=next(counter)
            ),
            step=lambda label: marks.append((label, time.perf_counter())),
        )
        marks.append(("end", time.perf_counter()))
        for (label, start), (_, stop) in itertools.pairwise(marks):
            stage_samples.setdefault(label, []).append(stop - start)

    row["convert_s"] = median_seconds(convert_once, repeats)
    row["stages_s"] = {label: statistics.median(v) for label, v in stage_samples.items()}
    progress.advance(task)
    row["export_legacy_s"] = median_seconds(
        lambda: plain_export(module, shape, workdir / f"{name}.plain.onnx", False), repeats
    )
    progress.advance(task)
    try:
        row["export_dynamo_s"] = median_seconds(
            lambda: plain_export(module, shape, workdir / f"{name}.dynamo.onnx", True),
            max(1, repeats // 2),
        )
    except Exception as error:  # the dynamo exporter is optional for this comparison
        row["export_dynamo_s"] = float("nan")
        row["dynamo_error"] = str(error).splitlines()[0][:120]
    progress.advance(task)

    folded = ort_session(workdir / "repo" / name / "1" / "model.onnx", threads)
    unfolded = ort_session(workdir / f"{name}.plain.onnx", threads)
    torch.set_num_threads(threads)
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32)
        tensor = torch.from_numpy(x)

        def run_torch(tensor=tensor) -> None:
            with torch.no_grad():
                module(tensor)

        latencies = interleaved_latency_ms(
            {
                "ort_folded": lambda x=x: folded.run(None, {"input": x}),
                "ort_unfolded": lambda x=x: unfolded.run(None, {"input": x}),
                "torch_eval": run_torch,
            },
            rounds=repeats,
        )
        for key, (median, fastest) in latencies.items():
            row[f"{key}_b{batch}_ms"] = median
            row[f"{key}_b{batch}_ms_min"] = fastest
        progress.advance(task)
    return row


def interleaved_latency_ms(
    runs: dict, rounds: int, block: int = 5
) -> dict[str, tuple[float, float]]:
    """Median and fastest latency of each variant, timed in blocks that take turns.

    Taking turns means a burst of other work on the machine lands on all
    variants alike. Each block starts with an untimed run: a runtime's worker
    threads keep spinning for a moment after a run, and on two cores the
    spinning threads of the variant timed just before would otherwise slow the
    first run of the next.
    """
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: (statistics.median(values), min(values)) for key, values in samples.items()}


STAGE_ORDER = ("trace", "fold", "export", "verify", "write")


def write_report(
    rows: list[dict],
    threads: int,
    repeats: int,
    plot: Path,
    load: tuple[float, float],
    machine: Machine,
) -> None:
    """The section of BENCHMARKS.md between its markers: tables, ratios and verdicts."""
    lines = [
        "## Converter: conversion time and latency",
        "",
        machine.line(*load),
        f"Command: `python benchmarks/convert_bench.py --repeats {repeats}` ({threads} torch "
        f"threads / {threads} onnxruntime threads for the latencies; medians; latencies timed "
        "in interleaved rounds, each variant in turn).",
        "",
        "### Conversion time",
        "",
        "Target: `bnfold convert` within 2× of a plain `torch.onnx.export` of the same model. "
        "In torch 2.13 a plain `torch.onnx.export(model, args, f)` runs the dynamo exporter "
        "(`dynamo=True` is the default); the TorchScript exporter, which bnfold itself uses, "
        "is the faster one, so both are shown and judged.",
        "",
        "| model | bnfold convert (s) | plain export, dynamo = default (s) | ratio | "
        "plain export, TorchScript (s) | ratio | target (≤ 2×) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        legacy_ratio = row["convert_s"] / row["export_legacy_s"]
        dynamo_ratio = row["convert_s"] / row["export_dynamo_s"]
        verdicts = "; ".join(
            f"vs {exporter}: " + ("met" if ratio <= 2 else f"missed by {ratio / 2:.1f}×")
            for exporter, ratio in (("default", dynamo_ratio), ("TorchScript", legacy_ratio))
        )
        lines.append(
            f"| {row['model']} | {row['convert_s']:.2f} | {row['export_dynamo_s']:.2f} | "
            f"{dynamo_ratio:.2f}× | {row['export_legacy_s']:.2f} | {legacy_ratio:.2f}× | "
            f"{verdicts} |"
        )
    for row in rows:
        if row.get("dynamo_error"):
            lines.append(f"\n{row['model']}: the dynamo export failed: `{row['dynamo_error']}`")
    export_share = ", ".join(
        f"{row['stages_s']['export'] / row['export_legacy_s']:.1f}× ({row['model']})"
        for row in rows
    )
    lines += [
        "",
        "Where the conversion time goes (median seconds per stage):",
        "",
        "| model | " + " | ".join(STAGE_ORDER) + " |",
        "|---|" + "---|" * len(STAGE_ORDER),
    ]
    for row in rows:
        stages = row["stages_s"]
        lines.append(
            f"| {row['model']} | "
            + " | ".join(f"{stages.get(stage, float('nan')):.2f}" for stage in STAGE_ORDER)
            + " |"
        )
    lines += [
        "",
        f"The export stage (two graphs plus the checker) against one plain TorchScript export: "
        f"{export_share}.",
        "",
        "### Inference latency",
        "",
        "Targets: the folded model.onnx at least as fast as onnxruntime's best on the unfolded "
        "export (ORT_ENABLE_ALL, which fuses Conv+BN itself) and ≥ 1.5× faster than torch eval.",
        "",
        "Each cell: median ms (fastest run in brackets: other work on a shared machine only "
        "ever adds time, so the fastest run is the least disturbed). Ratios and verdicts use "
        "the medians.",
        "",
        "| model | batch | ORT folded | ORT unfolded | torch eval | "
        "unfolded / folded | torch / folded | targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for batch in (1, 8):
            folded, unfolded, eager = (
                row[f"{k}_b{batch}_ms"] for k in ("ort_folded", "ort_unfolded", "torch_eval")
            )
            verdicts = [
                "≥ unfolded: met"
                if unfolded / folded >= 0.97
                else f"≥ unfolded: missed by {(folded / unfolded - 1) * 100:.0f} %",
                "≥ 1.5× torch: met"
                if eager / folded >= 1.5
                else f"≥ 1.5× torch: missed ({eager / folded:.2f}×)",
            ]
            fastest = [
                row[f"{k}_b{batch}_ms_min"] for k in ("ort_folded", "ort_unfolded", "torch_eval")
            ]
            cells = " | ".join(
                f"{median:.2f} ({low:.2f})"
                for median, low in zip((folded, unfolded, eager), fastest, strict=True)
            )
            lines.append(
                f"| {row['model']} | {batch} | {cells} | "
                f"{unfolded / folded:.2f}× | {eager / folded:.2f}× | {'; '.join(verdicts)} |"
            )
    lines += [
        "",
        '"≥ unfolded" counts as met within 3 %.',
        "",
        f"![converter benchmark]({plot.relative_to(ROOT)})",
    ]
    replace_section(SECTION, "\n".join(lines))


def draw_plot(rows: list[dict], plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [row["model"] for row in rows]
    positions = np.arange(len(names))
    width = 0.27
    for offset, (key, label) in enumerate(
        [
            ("convert_s", "bnfold convert"),
            ("export_legacy_s", "export (TorchScript)"),
            ("export_dynamo_s", "export (dynamo, the default)"),
        ]
    ):
        axes[0].bar(
            positions + (offset - 1) * width, [row[key] for row in rows], width, label=label
        )
    axes[0].set_xticks(positions, names)
    axes[0].set_ylabel("seconds")
    axes[0].set_title("Conversion time")
    axes[0].legend()
    labels = [f"{row['model']}\nbatch {b}" for row in rows for b in (1, 8)]
    positions = np.arange(len(labels))
    for offset, (key, label) in enumerate(
        [
            ("ort_folded", "ORT folded"),
            ("ort_unfolded", "ORT unfolded"),
            ("torch_eval", "torch eval"),
        ]
    ):
        axes[1].bar(
            positions + (offset - 1) * width,
            [row[f"{key}_b{b}_ms"] for row in rows for b in (1, 8)],
            width,
            label=label,
        )
    axes[1].set_xticks(positions, labels)
    axes[1].set_ylabel("ms (median)")
    axes[1].set_title("Inference latency")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(plot, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write BENCHMARKS.md and the plot again from the last run's results.json",
    )
    arguments = parser.parse_args()
    plot = ROOT / "benchmarks" / "convert_bench.png"
    if arguments.report_only:
        saved = json.loads(RESULTS.read_text())
        # A run saved before the machine was recorded: described now, as its report always was.
        machine = Machine(**saved["machine"]) if "machine" in saved else describe_machine(PACKAGES)
        draw_plot(saved["rows"], plot)
        write_report(
            saved["rows"], saved["threads"], saved["repeats"], plot, tuple(saved["load"]), machine
        )
        return
    rows = []
    machine = describe_machine(PACKAGES)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir, Progress() as progress:
        task = progress.add_task("benchmarking", total=len(arguments.models) * 5)
        for name in arguments.models:
            progress.update(task, description=f"benchmarking {name}")
            rows.append(
                bench_model(
                    name, arguments.repeats, arguments.threads, Path(workdir), progress, task
                )
            )
    load = (load_start, os.getloadavg()[0])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "rows": rows,
                "threads": arguments.threads,
                "repeats": arguments.repeats,
                "load": load,
                "machine": asdict(machine),
            },
            indent=2,
        )
    )
    draw_plot(rows, plot)
    write_report(rows, arguments.threads, arguments.repeats, plot, load, machine)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
