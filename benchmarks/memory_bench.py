"""Resident memory benchmark: where a serving process's memory goes, and what traffic adds.

Servers (`bnfold serve`, fresh for each row, gRPC on as in production) are read
from outside, in /proc/PID/status (VmRSS, VmHWM) and /proc/PID/smaps_rollup
(anonymous memory; file-backed is the rest of the RSS: shared libraries and
Python's own files, which other processes may share):

* an empty repository: the interpreter, the imports and the servers, no model;
* the serving benchmark's repository (digits MLP + ImageNet-shaped ResNet-18,
  `serving.harness.ensure_repository`) with `--no-warmup`: after load;
* the same with warm-up (the default): at READY, then again after a load phase
  (`--mlp-requests` V2 JSON requests to the MLP, then `--resnet-requests`
  binary requests to ResNet-18, each from `--clients` keep-alive clients);
* the default repository (models/repository, the four digits models) at READY.

Then the breakdown, in child processes so that one part's leftovers never count
against another: the marginal RSS of each top-level import (imported last, after
every other one), and per package graph the RSS the service's own `open_session`
adds (after `malloc_trim`, so only what the session holds), then its warm-up runs
(`plan_warmup`, as the server makes them).

`--ab` instead times session runs side by side in one process: the sessions
opened as the service opens them now (`sessions.open_session`) against the
options before issue 18 (one arena per session, grown by powers of two),
ResNet-18 at 1 and 8 rows and the MLP at 1 and 32, in interleaved rounds;
the median of the per-round ratios is printed.

Prints the tables and saves benchmarks/out/memory/results.json; `--section
PATH` writes BENCHMARKS.md's section ("Resident memory: where it goes") into
PATH between its markers.

    python benchmarks/memory_bench.py [--clients 8] [--mlp-requests 200] [--resnet-requests 100]
    python benchmarks/memory_bench.py --ab [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from warmup_bench import KeepAlive, http_request, request_body

from report_section import describe_machine, replace_section
from serving.harness import (
    PYTHON,
    ROOT,
    WORK,
    bnfold_command,
    ensure_repository,
    free_port,
    serve,
)

OUT = WORK.parent / "memory"
SECTION = "memory-bench"
MB = 1e6
DEFAULT_REPOSITORY = ROOT / "models" / "repository"
#: the top-level imports of `bnfold serve` whose marginal cost is measured
IMPORTS = (
    "numpy",
    "onnxruntime",
    "onnx",
    "fastapi",
    "uvicorn",
    "grpc",
    "tritonclient.grpc",
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "prometheus_client",
    "typer",
    "orjson",
)


@dataclass(frozen=True)
class Reading:
    """One process's memory at one point, in MB (10**6 bytes)."""

    rss: float
    hwm: float
    anonymous: float
    file_backed: float


def read_memory(pid: int) -> Reading:
    status = _kilobytes(Path(f"/proc/{pid}/status"))
    rollup = _kilobytes(Path(f"/proc/{pid}/smaps_rollup"))
    return Reading(
        rss=status["VmRSS"] / MB,
        hwm=status["VmHWM"] / MB,
        anonymous=rollup["Anonymous"] / MB,
        file_backed=(rollup["Rss"] - rollup["Anonymous"]) / MB,
    )


def _kilobytes(path: Path) -> dict[str, int]:
    fields = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


@dataclass(frozen=True)
class Point:
    """A server's memory at one point of its life."""

    repository: str
    point: str
    memory: Reading


def drive(port: int, model: str, repository: Path, requests: int, clients: int) -> None:
    """`requests` inferences of one seeded sample, spread over `clients` keep-alive clients."""
    body, headers = request_body(repository, model)
    request = http_request("POST", f"/v2/models/{model}/infer", body, **headers)
    shares = [requests // clients + (index < requests % clients) for index in range(clients)]
    failures: list[str] = []

    def client(count: int) -> None:
        connection = KeepAlive(port)
        try:
            for _ in range(count):
                status = connection.exchange(request)
                if status != 200:
                    failures.append(f"{model} answered {status}")
                    return
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(share,)) for share in shares if share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(failures[0])


def server_points(args: argparse.Namespace, bench: Path) -> list[Point]:
    points = []
    with tempfile.TemporaryDirectory() as empty:
        points.append(_start(Path(empty), "empty repository", "imports, no model"))
    points.append(_start(bench, "MLP + ResNet-18", "after load (--no-warmup)", "--no-warmup"))
    port = free_port()
    with serve("memory-bench", bnfold_command(bench, port), port) as server:
        time.sleep(1.0)  # the log lines and the first metrics scrape settle
        points.append(Point("MLP + ResNet-18", "ready (warm-up)", read_memory(server.process.pid)))
        drive(port, "digits_mlp", bench, args.mlp_requests, args.clients)
        drive(port, "resnet18", bench, args.resnet_requests, args.clients)
        time.sleep(2.0)  # the drift monitor measures its last samples
        points.append(Point("MLP + ResNet-18", "after traffic", read_memory(server.process.pid)))
    points.append(_start(DEFAULT_REPOSITORY, "default (4 digits models)", "ready (warm-up)"))
    return points


def _start(repository: Path, name: str, point: str, *options: str) -> Point:
    port = free_port()
    with serve("memory-bench", bnfold_command(repository, port, *options), port) as server:
        time.sleep(1.0)
        return Point(name, point, read_memory(server.process.pid))


IMPORT_CHILD = r"""
import importlib, sys
from pathlib import Path
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
target, others = sys.argv[1], sys.argv[2:]
for name in others:
    importlib.import_module(name)
before = rss()
importlib.import_module(target)
print(rss() - before)
"""


def import_costs() -> dict[str, float]:
    """The RSS each import adds when imported after every other one (what leaving it out
    would save), and `bnfold.cli` after all of them (bnfold's own modules)."""
    costs = {}
    for name in (*IMPORTS, "bnfold.cli"):
        others = [other for other in IMPORTS if other != name]
        added = subprocess.run(
            [PYTHON, "-c", IMPORT_CHILD, name, *others], capture_output=True, text=True, check=True
        )
        costs[name] = int(added.stdout) / MB
    return costs


SESSION_CHILD = r"""
import ctypes, gc, json, sys
from pathlib import Path
from bnfold.service.heap import fix_malloc_thresholds
from bnfold.service.repository import read_package, scan_repository
from bnfold.service.external_data import external_file_table
from bnfold.service.sessions import SessionConfig, open_session, warmup_run_options
from bnfold.service.warmup import plan_warmup, zero_feeds
from bnfold.service.batch_policy import BatchPolicy
fix_malloc_thresholds()
trim = ctypes.CDLL(None).malloc_trim
def rss():
    gc.collect()
    trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
repository, model, graph_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = SessionConfig(providers=("CPUExecutionProvider",), intra_op_threads=len(__import__("os").sched_getaffinity(0)))
if graph_file == "calibration.onnx":
    config = config.for_calibration()
[tiny] = [found for found in scan_repository(repository) if found.name == "digits_mlp"]
runtime = open_session(read_package(tiny).eval_graph, {}, config)  # onnxruntime's one-time set-up
before = rss()
[location] = [found for found in scan_repository(repository) if found.name == model]
package = read_package(location)
graph = package.contents[graph_file]
files = external_file_table(graph, graph_file, package.contents)
inputs, graph_bytes = package.manifest.inputs, len(graph)
session = open_session(graph, files, config)
del package, graph, files  # as after a load: only the session keeps anything alive
opened = rss()
plan = [run for run in plan_warmup(BatchPolicy(), inputs, calibration=True, max_bytes=64 << 20)
        if run.graph == graph_file]
for run in plan:
    session.run(None, zero_feeds(inputs, run.rows), warmup_run_options(config))
warmed = rss()
print(json.dumps({"session": opened - before, "warmup": warmed - opened,
                  "graph_bytes": graph_bytes, "rows": [run.rows for run in plan]}))
"""


def session_costs(repository: Path) -> list[dict[str, object]]:
    """Per graph of each model: what its session holds, and what its warm-up runs add."""
    rows = []
    for model in ("digits_mlp", "resnet18"):
        for graph_file in ("model.onnx", "train.onnx", "calibration.onnx"):
            measured = subprocess.run(
                [PYTHON, "-c", SESSION_CHILD, str(repository), model, graph_file],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            cost = json.loads(measured.stdout)
            rows.append(
                {
                    "model": model,
                    "graph": graph_file,
                    "graph_mb": cost["graph_bytes"] / MB,
                    "session_mb": cost["session"] / MB,
                    "warmup_mb": cost["warmup"] / MB,
                    "warmup_rows": cost["rows"],
                }
            )
    return rows


# ---------------------------------------------------------------- run-time A/B


def ab_rounds(repository: Path, rounds: int) -> list[dict[str, object]]:
    """Median per-round ratio (now / before) of session run times, sessions side by side."""
    import numpy as np
    import onnxruntime as ort

    from bnfold.service.heap import fix_malloc_thresholds
    from bnfold.service.sessions import SessionConfig, open_session

    fix_malloc_thresholds()  # as the server does
    config = SessionConfig(
        providers=("CPUExecutionProvider",), intra_op_threads=len(os.sched_getaffinity(0))
    )

    def before(graph: bytes) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = True
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(graph, options, providers=list(config.providers))

    cases = (
        ("resnet18", 1, 4),
        ("resnet18", 8, 1),
        ("digits_mlp", 1, 2000),
        ("digits_mlp", 32, 1000),
    )
    sessions = {}
    for model in ("resnet18", "digits_mlp"):
        graph = (repository / model / "1" / "model.onnx").read_bytes()
        sessions[model] = {"before": before(graph), "now": open_session(graph, {}, config)}
    rng = np.random.default_rng(18)
    feeds = {}
    for model, rows, _ in cases:
        tensor = sessions[model]["now"].get_inputs()[0]
        shape = [rows, *tensor.shape[1:]]
        feeds[model, rows] = {tensor.name: rng.normal(size=shape).astype(np.float32)}
        for session in sessions[model].values():
            for _ in range(2):
                session.run(None, feeds[model, rows])
    times: dict[tuple[str, int, str], list[float]] = {}
    for round_number in range(rounds):
        for model, rows, repeats in cases:
            order = ("before", "now") if round_number % 2 == 0 else ("now", "before")
            for variant in order:
                session, feed = sessions[model][variant], feeds[model, rows]
                started = time.perf_counter()
                for _ in range(repeats):
                    session.run(None, feed)
                elapsed = (time.perf_counter() - started) / repeats
                times.setdefault((model, rows, variant), []).append(elapsed)
    results = []
    for model, rows, _ in cases:
        old, new = times[model, rows, "before"], times[model, rows, "now"]
        ratios = [after / first for first, after in zip(old, new, strict=True)]
        results.append(
            {
                "model": model,
                "rows": rows,
                "before_ms": statistics.median(old) * 1e3,
                "now_ms": statistics.median(new) * 1e3,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return results


# ---------------------------------------------------------------- report


def points_table(points: list[Point]) -> str:
    lines = [
        "| repository | point | RSS (MB) | peak RSS, VmHWM (MB) | anonymous (MB) | file-backed (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for point in points:
        memory = point.memory
        lines.append(
            f"| {point.repository} | {point.point} | {memory.rss:.0f} | {memory.hwm:.0f} | "
            f"{memory.anonymous:.0f} | {memory.file_backed:.0f} |"
        )
    return "\n".join(lines)


def breakdown_table(imports: dict[str, float], sessions: list[dict[str, object]]) -> str:
    lines = ["| component | MB |", "|---|---|"]
    for session in sessions:
        rows = ", ".join(str(rows) for rows in session["warmup_rows"])  # type: ignore[union-attr]
        lines.append(
            f"| {session['model']} {session['graph']}: session "
            f"({session['graph_mb']:.1f} MB of graph) | {session['session_mb']:.1f} |"
        )
        lines.append(
            f"| {session['model']} {session['graph']}: warm-up runs at {rows} rows "
            f"| {session['warmup_mb']:.1f} |"
        )
    for name, cost in sorted(imports.items(), key=lambda item: -item[1]):
        lines.append(f"| import {name} (marginal) | {cost:.1f} |")
    return "\n".join(lines)


def ab_table(results: list[dict[str, object]]) -> str:
    lines = [
        "| graph | rows | before (ms) | now (ms) | now / before, median of rounds (min-max) |",
        "|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['model']} model.onnx | {row['rows']} | {row['before_ms']:.3f} | "
            f"{row['now_ms']:.3f} | {row['ratio_median']:.3f} "
            f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mlp-requests", type=int, default=200)
    parser.add_argument("--resnet-requests", type=int, default=100)
    parser.add_argument("--ab", action="store_true", help="time session runs, now / before")
    parser.add_argument("--rounds", type=int, default=9, help="A/B rounds")
    parser.add_argument("--section", type=Path, help="write the section into this file")
    args = parser.parse_args()
    bench = ensure_repository()
    OUT.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    machine = describe_machine(("onnxruntime", "fastapi", "uvicorn", "numpy"))
    if args.ab:
        results = ab_rounds(bench, args.rounds)
        print(machine.line(load_start, os.getloadavg()[0]))
        print(ab_table(results))
        (OUT / "ab.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    points = server_points(args, bench)
    imports = import_costs()
    sessions = session_costs(bench)
    machine_line = machine.line(load_start, os.getloadavg()[0])
    section = "\n\n".join(
        (
            "### Resident memory: where it goes (`make bench-memory`)",
            machine_line,
            points_table(points),
            breakdown_table(imports, sessions),
        )
    )
    print(section)
    results = {
        "machine": asdict(machine),
        "points": [asdict(point) for point in points],
        "imports": imports,
        "sessions": sessions,
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.section is not None:
        replace_section(SECTION, section, args.section)


if __name__ == "__main__":
    sys.exit(main())
