"""ONNX folding against the peers: BN nodes left and onnxruntime latency.

For each built-in model exported the plain way (TorchScript exporter,
`do_constant_folding=False`, so every BatchNormalization node remains), three
ways to get rid of BatchNorm are compared, all run by onnxruntime with
ORT_ENABLE_ALL (what the service does):

  * onnxruntime's own optimizer alone, on the exported file;
  * onnxslim (`onnxslim.slim`), a peer tool users would pick, then onnxruntime;
  * `bnfold convert model.onnx` (the ONNX path), then onnxruntime.

"BN left" counts BatchNormalization nodes in the graph onnxruntime finally
runs (its optimized model, dumped with `optimized_model_filepath`). Latency
is the fastest, over interleaved rounds (each round times every variant in
turn), of the mean time of one `session.run`, with one intra-op thread (the
service's default): on a shared machine other work only adds time.

A second table measures the one remaining design question of the issue: is
a kept BN faster rewritten as Mul+Add (scale and shift precomputed with
`fold.batchnorm_affine`) than as onnxruntime's BatchNormalization kernel?

    python benchmarks/onnx_fold_bench.py            # print the tables
    python benchmarks/onnx_fold_bench.py --write    # and update BENCHMARKS.md

The section holds tables and numbers only: what they mean is written by hand below it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxslim
import torch
from onnx import TensorProto, helper, numpy_helper

from bnfold.convert.fold import BatchNormParams, batchnorm_affine
from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.models.registry import BUILTIN_MODELS, load_builtin

from report_section import Machine, describe_machine, replace_section

SECTION = "onnx-fold-bench"
PACKAGES = ("onnxruntime", "onnx", "onnxslim", "torch")
VARIANTS = ("onnxruntime", "onnxslim", "bnfold")
KEPT_SHAPES = ((1, 32, 8, 8), (8, 64, 32, 32), (32, 64, 16), (1, 64), (64, 128))


def export_plain(name: str, path: Path) -> tuple[int, ...]:
    spec = BUILTIN_MODELS[name]
    module = load_builtin(name)
    torch.onnx.export(
        module,
        (torch.randn(*spec.input_shape),),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=17,
    )
    return spec.input_shape


def options(optimized_path: Path | None = None) -> onnxruntime.SessionOptions:
    session_options = onnxruntime.SessionOptions()
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = 1
    session_options.log_severity_level = 3
    if optimized_path is not None:
        session_options.optimized_model_filepath = str(optimized_path)
    return session_options


def batchnorms(path: Path) -> int:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)["BatchNormalization"]


def runtime_ops(path: Path) -> Counter[str]:
    """Op types of the graph onnxruntime actually runs after ORT_ENABLE_ALL."""
    optimized = path.with_suffix(".ort.onnx")
    onnxruntime.InferenceSession(str(path), options(optimized), providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def interleaved_latency(
    paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int
) -> dict[str, list[float]]:
    """Per round, the mean run time (ms) of each variant; variants are timed in turn."""
    sessions = {
        label: onnxruntime.InferenceSession(
            str(path), options(), providers=["CPUExecutionProvider"]
        )
        for label, path in paths.items()
    }
    runs = {}
    for label, session in sessions.items():
        for _ in range(3):
            session.run(None, feed)
        start = time.perf_counter()
        session.run(None, feed)
        runs[label] = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            start = time.perf_counter()
            for _ in range(runs[label]):
                session.run(None, feed)
            samples[label].append((time.perf_counter() - start) / runs[label] * 1e3)
    return samples


def compare_model(name: str, workdir: Path, batches: tuple[int, ...], rounds: int) -> list[dict]:
    source = workdir / f"{name}.onnx"
    input_shape = export_plain(name, source)
    slim = workdir / f"{name}.slim.onnx"
    onnx.save(onnxslim.slim(onnx.load(str(source))), str(slim))
    result = convert_onnx_file(
        source, repository=workdir / "repo", name=name, version=None, sample=None
    )
    folded = Path(result.package_path) / "model.onnx"
    paths = {"onnxruntime": source, "onnxslim": slim, "bnfold": folded}
    ops = {label: runtime_ops(path) for label, path in paths.items()}
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *input_shape[1:])).astype(np.float32)
        samples = interleaved_latency(paths, {"input": x}, rounds)
        latency = {label: min(values) for label, values in samples.items()}
        rows.append(
            {
                "model": name,
                "batch": batch,
                "bn_source": batchnorms(source),
                "bn_left": {label: ops[label]["BatchNormalization"] for label in VARIANTS},
                "same_runtime_graph": ops["bnfold"] == ops["onnxruntime"] == ops["onnxslim"],
                "latency": latency,
            }
        )
    return rows


def kept_bn_graphs(shape: tuple[int, ...]) -> dict[str, onnx.ModelProto]:
    """Relu ─► BN ─► Relu, and the same with the BN as Mul(scale)+Add(shift)."""
    generator = np.random.default_rng(1)
    channels = shape[1]
    bn = BatchNormParams(
        running_mean=generator.uniform(-1, 1, channels),
        running_var=generator.uniform(0.5, 2, channels),
        eps=1e-5,
        gamma=generator.uniform(0.5, 2, channels),
        beta=generator.uniform(-1, 1, channels),
    )
    broadcast = (channels,) + (1,) * (len(shape) - 2)
    scale, shift = batchnorm_affine(bn)
    graphs = {}
    for label in ("BatchNormalization", "Mul+Add"):
        if label == "BatchNormalization":
            names = ["gamma", "beta", "running_mean", "running_var"]
            inits = [
                numpy_helper.from_array(np.asarray(getattr(bn, n), np.float32), n) for n in names
            ]
            middle = [helper.make_node("BatchNormalization", ["r", *names], ["y"], epsilon=bn.eps)]
        else:
            inits = [
                numpy_helper.from_array(scale.reshape(broadcast).astype(np.float32), "scale"),
                numpy_helper.from_array(shift.reshape(broadcast).astype(np.float32), "shift"),
            ]
            middle = [
                helper.make_node("Mul", ["r", "scale"], ["s"]),
                helper.make_node("Add", ["s", "shift"], ["y"]),
            ]
        graph = helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["r"]),
                *middle,
                helper.make_node("Relu", ["y"], ["z"]),
            ],
            "kept",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, list(shape))],
            inits,
        )
        graphs[label] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return graphs


def compare_kept(workdir: Path, rounds: int) -> list[dict]:
    rows = []
    for shape in KEPT_SHAPES:
        paths = {}
        for label, model in kept_bn_graphs(shape).items():
            paths[label] = workdir / f"kept_{label}_{'x'.join(map(str, shape))}.onnx"
            onnx.save(model, str(paths[label]))
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        samples = interleaved_latency(paths, {"x": x}, rounds)
        latency = {label: min(values) for label, values in samples.items()}
        rows.append({"shape": shape, "latency": latency})
    return rows


def markdown(
    rows: list[dict], kept: list[dict], command: str, machine: Machine, load: tuple[float, float]
) -> str:
    """The section between the markers: tables and ratios."""
    lines = [
        "## ONNX folding: bnfold vs onnxruntime's optimizer vs onnxslim",
        "",
        machine.line(*load),
        f"Command: `{command}`. One onnxruntime intra-op thread, ORT_ENABLE_ALL for every "
        "variant. Latency (ms per `run`) is the fastest of interleaved rounds: each round "
        "times every variant in turn over ~50 ms, and on a shared machine other work only "
        "ever adds time, so the minimum is the least disturbed estimate.",
        "",
        "Sources are the built-in models exported the plain way (TorchScript exporter, "
        "`do_constant_folding=False`, opset 17): every BatchNormalization node is in the file. "
        "*BN left* counts BatchNormalization nodes in the graph onnxruntime finally runs.",
        "",
        "*Same graph* says whether onnxruntime ends up running the same ops for all three.",
        "",
        "| model | batch | BN in source | BN left: onnxruntime | BN left: onnxslim | "
        "BN left: bnfold | same graph | onnxruntime (ms) | onnxslim (ms) | bnfold (ms) | "
        "bnfold / best peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency = row["latency"]
        best_peer = min(latency["onnxruntime"], latency["onnxslim"])
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['bn_source']} | "
            + " | ".join(str(row["bn_left"][v]) for v in VARIANTS)
            + f" | {'yes' if row['same_runtime_graph'] else 'no'} | "
            + " | ".join(f"{latency[v]:.3f}" for v in VARIANTS)
            + f" | {latency['bnfold'] / best_peer:.2f} |"
        )
    lines += [
        "",
        "### Kept BatchNorms: BatchNormalization kernel or Mul+Add?",
        "",
        "A BN that cannot fold (after a ReLU, before a zero-padded conv) could be rewritten "
        "as Mul(scale)+Add(shift) with `fold.batchnorm_affine`. Relu ─► BN ─► Relu, timed "
        "both ways:",
        "",
        "| input shape | BatchNormalization (ms) | Mul+Add (ms) | Mul+Add / BN |",
        "|---|---|---|---|",
    ]
    for row in kept:
        bn_ms, mul_add_ms = row["latency"]["BatchNormalization"], row["latency"]["Mul+Add"]
        shape = "×".join(map(str, row["shape"]))
        lines.append(f"| {shape} | {bn_ms:.4f} | {mul_add_ms:.4f} | {mul_add_ms / bn_ms:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(BUILTIN_MODELS))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    arguments = parser.parse_args()
    command = "python benchmarks/onnx_fold_bench.py" + (
        f" --rounds {arguments.rounds}" if arguments.rounds != 21 else ""
    )
    machine = describe_machine(PACKAGES)
    load_start = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-onnx-bench-") as scratch:
        workdir = Path(scratch)
        for name in arguments.models:
            batches = (1, 32) if BUILTIN_MODELS[name].trained_on_digits else (1, 8)
            rows.extend(compare_model(name, workdir, batches, arguments.rounds))
            print(f"{name}: done", flush=True)
        kept = compare_kept(workdir, arguments.rounds)
    text = markdown(rows, kept, command, machine, (load_start, os.getloadavg()[0]))
    print(text)
    if arguments.write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
