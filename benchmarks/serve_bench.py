"""Serving benchmark: bnfold side by side with the servers a user would compare it to.

In one run, on 127.0.0.1 only, for the digits MLP (tiny) and the ImageNet-shaped
ResNet-18 (heavy), at 1, 8 and 32 concurrent clients, each sending one sample
per request:

  1. bnfold (`bnfold serve`, its defaults), V2 JSON and binary tensors over REST, and
     the V2 gRPC protocol (raw tensors), one server for the three;
  2. the hand-written FastAPI + onnxruntime JSON server (benchmarks/baseline_server.py);
  3. onnxruntime called in-process, at its best batch size and threading (the limit);
  4. an empty FastAPI POST handler (benchmarks/empty_server.py, the HTTP ceiling).

The headline point (digits MLP JSON) is also measured side by side at 1 and 8
clients, bnfold and the empty handler both up and taking 2 s turns for 10 rounds
(serving/side_by_side.py): the targets table judges the ratio to the empty handler
by the median of those rounds, not by two points measured minutes apart. Likewise
ResNet-18's targets: bnfold's throughput at 8 clients and p50 at one, against
in-process onnxruntime's best and batch-1 p50, taking 3 s turns for 5 rounds.

Also the cost of drift monitoring: bnfold with monitoring off and on at several sample
fractions, in interleaved rounds, on the MLP JSON and ResNet-18 binary points at 8
clients (`--drift-only` runs just that and writes just its section).

Load comes from wrk (one thread, keep-alive connections, a Lua script for the
POST bodies); without wrk, from a bounded asyncio client in this process
(slower: its numbers are the client's as much as the server's). gRPC load comes
from a bounded asyncio grpcio client in this process, one connection a client,
the same way (no gRPC load generator is in the registries: serving/load.py). Every point
runs `--duration` seconds after a one-second warm-up. Also measured: bnfold's
start-to-ready time and memory on the default repository, the memory of
`--workers 2`, and the session options and batching delay the defaults were
chosen by (`--tune`: alternatives on the same points).

Saves the run to benchmarks/out/serve/results.json, and writes its section of
BENCHMARKS.md (tables and numbers only: what they mean is written by hand below
the section) and benchmarks/serve_bench.png. The parts live in benchmarks/serving/.

    python benchmarks/serve_bench.py [--duration 5] [--concurrency 1 8 32] [--no-tune] [--no-write]
    python benchmarks/serve_bench.py --drift-only [--drift-rounds 3] [--drift-fractions 0.01 0.05]
    python benchmarks/serve_bench.py --report-only   # re-render the last run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from report_section import describe_machine
from serving import drift_cost
from serving.harness import WORK, ensure_repository
from serving.in_process import in_process
from serving.load import driver_description
from serving.profiling import bench_profile
from serving.report import targets, write_report
from serving.results import MODELS, ServeResults, read_results, save_results
from serving.runs import (
    bench_beside_limit,
    bench_servers,
    bench_side_by_side,
    bench_startup,
    bench_tuning,
    bench_workers,
)

RESULTS = WORK / "results.json"
PACKAGES = ("onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "orjson", "numpy", "grpcio")


def _default_fraction() -> float:
    from bnfold.service.settings import Settings

    return float(Settings.model_fields["drift_sample_fraction"].default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-tune", action="store_true", help="skip the settings comparison")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--tune-only", action="store_true", help="only the settings comparison, printed"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write BENCHMARKS.md and the plot again from the last run's results.json",
    )
    parser.add_argument("--no-drift", action="store_true", help="skip the drift cost comparison")
    parser.add_argument(
        "--drift-only", action="store_true", help="only the drift cost comparison, written"
    )
    parser.add_argument("--drift-rounds", type=int, default=3, help="on/off rounds")
    parser.add_argument(
        "--drift-fractions",
        type=float,
        nargs="+",
        default=[0.01, 0.05],
        help="sample fractions compared with monitoring off",
    )
    arguments = parser.parse_args()
    if arguments.report_only:  # each section from its own results, when the run saved them
        if RESULTS.is_file():
            write_report(read_results(RESULTS, describe_machine(PACKAGES)))
        if drift_cost.RESULTS.is_file():
            drift_cost.write_report(drift_cost.read())
        return
    WORK.mkdir(parents=True, exist_ok=True)
    machine = describe_machine(PACKAGES)
    run = {
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
        "duration": f"{arguments.duration:g}",
        "driver": driver_description(),
        "load_start": f"{os.getloadavg()[0]:.2f}",
    }
    repository = ensure_repository()
    if arguments.tune_only:
        bench_tuning(repository, arguments.duration)
        return
    if arguments.drift_only:
        _drift(repository, arguments, dict(run), write=not arguments.no_write)
        return
    limits = {model: in_process(repository, model, 2.0) for model in MODELS}
    for model, limit in limits.items():
        print(
            f"{model}: in-process best {limit.best_samples_per_s:,.1f} samples/s "
            f"(batch {limit.best_batch}, {limit.best_layout}), batch-1 p50 {limit.p50_ms}"
        )
    points, stats = bench_servers(repository, arguments.concurrency, arguments.duration)
    side_by_side = bench_side_by_side(repository)
    beside_limit = {"resnet18": bench_beside_limit(repository, "resnet18", limits["resnet18"])}
    startup = bench_startup()
    print(f"start to ready {startup['ready_s']:.2f} s, RSS {startup['rss_mb']:.0f} MB")
    workers = bench_workers(repository)
    print(f"--workers 2: {workers}")
    tuning = [] if arguments.no_tune else bench_tuning(repository, arguments.duration)
    profile = bench_profile(repository, arguments.duration)
    run["load_end"] = f"{os.getloadavg()[0]:.2f}"
    if not arguments.no_drift:
        _drift(repository, arguments, dict(run), write=not arguments.no_write)
    results = ServeResults(
        points,
        limits,
        startup,
        stats,
        side_by_side,
        beside_limit,
        workers,
        tuning,
        profile,
        run,
        machine,
    )
    save_results(results, RESULTS)
    for row in targets(points, limits, startup, side_by_side, beside_limit):
        print(" | ".join(row))
    if not arguments.no_write:
        write_report(results)


def _drift(
    repository: Path, arguments: argparse.Namespace, run: dict[str, str], write: bool
) -> None:
    """The drift cost comparison: measured, saved, printed, and its section written."""
    run["load_start"] = f"{os.getloadavg()[0]:.2f}"
    cost = drift_cost.bench_drift_cost(
        repository,
        arguments.duration,
        arguments.drift_rounds,
        arguments.drift_fractions,
        _default_fraction(),
        run,
        describe_machine(PACKAGES),
    )
    cost.run["load_end"] = f"{os.getloadavg()[0]:.2f}"
    drift_cost.save(cost)
    print(drift_cost.render(cost))
    if write:
        drift_cost.write_report(cost)


if __name__ == "__main__":
    main()
