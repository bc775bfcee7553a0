"""Serving benchmark: bnfold side by side with the servers a user would compare it to.

In one run, on 127.0.0.1 only, for the digits MLP (tiny) and the ImageNet-shaped
ResNet-18 (heavy), at 1, 8 and 32 concurrent clients, each sending one sample
per request:

  1. bnfold (`bnfold serve`, its defaults), V2 JSON and binary tensors;
  2. the hand-written FastAPI + onnxruntime JSON server (benchmarks/baseline_server.py);
  3. onnxruntime called in-process, at its best batch size and threading (the limit);
  4. an empty FastAPI POST handler (benchmarks/empty_server.py, the HTTP ceiling).

Load comes from wrk (one thread, keep-alive connections, a Lua script for the
POST bodies); without wrk, from a bounded asyncio client in this process
(slower: its numbers are the client's as much as the server's). Every point
runs `--duration` seconds after a one-second warm-up. Also measured: bnfold's
start-to-ready time and memory on the default repository, the memory of
`--workers 2`, and the session options and batching delay the defaults were
chosen by (`--tune`: alternatives on the same points).

Saves the run to benchmarks/out/serve/results.json, and writes its section of
BENCHMARKS.md (tables and numbers only: what they mean is written by hand below
the section) and benchmarks/serve_bench.png. The parts live in benchmarks/serving/.

    python benchmarks/serve_bench.py [--duration 5] [--concurrency 1 8 32] [--no-tune] [--no-write]
    python benchmarks/serve_bench.py --report-only   # re-render the last run
"""

from __future__ import annotations

import argparse
import os
import sys

from report_section import describe_machine
from serving.harness import WORK, ensure_repository
from serving.in_process import in_process
from serving.load import driver_description
from serving.profiling import bench_profile
from serving.report import targets, write_report
from serving.results import MODELS, ServeResults, read_results, save_results
from serving.runs import bench_repeats, bench_servers, bench_startup, bench_tuning, bench_workers

RESULTS = WORK / "results.json"
PACKAGES = ("onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "orjson", "numpy")


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
    arguments = parser.parse_args()
    if arguments.report_only:
        write_report(read_results(RESULTS, describe_machine(PACKAGES)))
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
    limits = {model: in_process(repository, model, 2.0) for model in MODELS}
    for model, limit in limits.items():
        print(
            f"{model}: in-process best {limit.best_samples_per_s:,.1f} samples/s "
            f"(batch {limit.best_batch}, {limit.best_layout}), batch-1 p50 {limit.p50_ms}"
        )
    points, stats = bench_servers(repository, arguments.concurrency, arguments.duration)
    repeats = bench_repeats(repository, arguments.duration)
    startup = bench_startup()
    print(f"start to ready {startup['ready_s']:.2f} s, RSS {startup['rss_mb']:.0f} MB")
    workers = bench_workers(repository)
    print(f"--workers 2: {workers}")
    tuning = [] if arguments.no_tune else bench_tuning(repository, arguments.duration)
    profile = bench_profile(repository, arguments.duration)
    run["load_end"] = f"{os.getloadavg()[0]:.2f}"
    results = ServeResults(
        points, limits, startup, stats, repeats, workers, tuning, profile, run, machine
    )
    save_results(results, RESULTS)
    for row in targets(points, limits, startup):
        print(" | ".join(row))
    if not arguments.no_write:
        write_report(results)


if __name__ == "__main__":
    main()
