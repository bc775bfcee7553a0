"""Converter benchmark: conversion time and the served model's latency.

Measures, in one run on one machine, for the ImageNet-shaped built-ins:
  * conversion time of `bnfold convert` (trace, fold, two exports, verification
    of both graphs, package) against a plain `torch.onnx.export` of the same
    model, with the TorchScript exporter and with torch's default (dynamo);
  * onnxruntime latency (ORT_ENABLE_ALL, the threads given) of the folded
    model.onnx against the plain unfolded export (BatchNormalization nodes
    left for onnxruntime's own fusions) and against torch eval.
Writes its section of BENCHMARKS.md and benchmarks/convert_bench.png.

    python benchmarks/convert_bench.py [--models resnet18 mobilenet_v2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from rich.progress import Progress

from bnfold.convert.pipeline import TorchConversionRequest, convert_torch
from bnfold.convert.sources import load_source
from bnfold.models.registry import BUILTIN_MODELS

ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- convert-bench:start -->"
MARK_END = "<!-- convert-bench:end -->"


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


def latency_ms(run, repeats: int) -> float:
    run()  # warm-up
    return median_seconds(run, repeats) * 1e3


def bench_model(
    name: str, repeats: int, threads: int, workdir: Path, progress: Progress, task
) -> dict:
    spec = BUILTIN_MODELS[name]
    loaded = load_source(name, weights=None, trust_pickle=False)
    module = copy.deepcopy(loaded.module).eval()
    shape = tuple(spec.input_shape)
    row: dict = {"model": name}

    counter = iter(range(1, 10_000))

    def convert_once() -> None:
        convert_torch(
            TorchConversionRequest(
                loaded=loaded, repository=workdir / "repo", version=next(counter)
            )
        )

    row["convert_s"] = median_seconds(convert_once, repeats)
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
        row[f"ort_folded_b{batch}_ms"] = latency_ms(
            lambda x=x: folded.run(None, {"input": x}), repeats * 4
        )
        row[f"ort_unfolded_b{batch}_ms"] = latency_ms(
            lambda x=x: unfolded.run(None, {"input": x}), repeats * 4
        )
        with torch.no_grad():
            row[f"torch_eval_b{batch}_ms"] = latency_ms(lambda tensor=tensor: module(tensor), repeats * 4)
        progress.advance(task)
    return row


def write_report(rows: list[dict], threads: int, repeats: int, plot: Path) -> None:
    lines = [
        MARK_START,
        "## Converter: conversion time and latency",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {_cpu_model()}, "
        f"{torch.get_num_threads()} torch threads / {threads} onnxruntime threads; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. Date: {date.today()}.",
        f"Command: `python benchmarks/convert_bench.py --repeats {repeats}` (medians).",
        "",
        "| model | bnfold convert (s) | plain export, TorchScript (s) | ratio | plain export, dynamo (s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['convert_s']:.2f} | {row['export_legacy_s']:.2f} | "
            f"{row['convert_s'] / row['export_legacy_s']:.2f}× | {row['export_dynamo_s']:.2f} | "
            f"{row['convert_s'] / row['export_dynamo_s']:.2f}× |"
        )
    lines += [
        "",
        "`bnfold convert` includes tracing, folding, two exports (model.onnx and train.onnx) "
        "and the verification of both graphs against torch on 3 eval and 2 train batches.",
        "",
        "| model | batch | ORT folded (ms) | ORT unfolded (ms) | torch eval (ms) | folded vs unfolded | folded vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for batch in (1, 8):
            folded, unfolded, eager = (
                row[f"{k}_b{batch}_ms"] for k in ("ort_folded", "ort_unfolded", "torch_eval")
            )
            lines.append(
                f"| {row['model']} | {batch} | {folded:.2f} | {unfolded:.2f} | {eager:.2f} | "
                f"{unfolded / folded:.2f}× faster | {eager / folded:.2f}× faster |"
            )
    lines += ["", f"![converter benchmark]({plot.relative_to(ROOT)})", MARK_END]
    section = "\n".join(lines)
    target = ROOT / "BENCHMARKS.md"
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    if MARK_START in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    target.write_text(text)


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
            ("export_dynamo_s", "export (dynamo)"),
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return (
                    line.split(":", 1)[1].strip()
                    + f" ({len(__import__('os').sched_getaffinity(0))} cores)"
                )
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir, Progress() as progress:
        task = progress.add_task("benchmarking", total=len(arguments.models) * 5)
        for name in arguments.models:
            progress.update(task, description=f"benchmarking {name}")
            rows.append(
                bench_model(
                    name, arguments.repeats, arguments.threads, Path(workdir), progress, task
                )
            )
    plot = ROOT / "benchmarks" / "convert_bench.png"
    draw_plot(rows, plot)
    write_report(rows, arguments.threads, arguments.repeats, plot)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
