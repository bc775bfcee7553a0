"""The measurements of one run: every server at every point, the headline point side by side,
start-up, the memory of `--workers 2`, and the settings the defaults were chosen by."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .harness import (
    baseline_command,
    bnfold_command,
    empty_command,
    free_port,
    memory_mb,
    metric_sum_count,
    serve,
)
from .load import check_answer, load, write_bodies
from .results import MODELS, InProcess, Point
from .side_by_side import against_in_process, alternating_turns, ratios, summarize

SIDE_BY_SIDE_CLIENTS = (1, 8)
SIDE_BY_SIDE_ROUNDS, SIDE_BY_SIDE_SECONDS = 10, 2.0


def bench_servers(
    repository: Path, concurrency: Sequence[int], seconds: float
) -> tuple[list[Point], dict[str, dict]]:
    """Every server on every model and encoding; also, for bnfold, its peak memory under this
    load and the mean rows of its runs (what the batcher merged)."""
    points: list[Point] = []
    stats: dict[str, dict] = {"peak_rss_mb": {}, "rows_per_run": {}}
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    port = free_port()
    grpc_port = free_port(port)
    bnfold = bnfold_command(repository, port, grpc_port=grpc_port)  # the same for each transport
    runs = [
        ("bnfold JSON", bnfold, "json"),
        ("bnfold binary", bnfold, "binary"),
        ("bnfold gRPC", bnfold, "grpc"),
        ("hand-written FastAPI", baseline_command(repository, port), "json"),
        ("empty handler", empty_command(port), "json"),
        ("empty handler, binary body", empty_command(port), "binary"),
    ]
    for name, command, encoding in runs:
        with serve(name, command, port) as server:
            for model in MODELS:
                url = (
                    f"grpc://127.0.0.1:{grpc_port}"
                    if encoding == "grpc"
                    else f"{server.url}/v2/models/{model}/infer"
                )
                check_answer(url, bodies[model][encoding])
                for clients in concurrency:
                    result = load(
                        url, bodies[model][encoding], clients, seconds, server.process.pid
                    )
                    points.append(Point(model, name, clients, result))
                    print(
                        f"{model:11s} {name:22s} c={clients:<3d} {result.rps:9.1f} req/s "
                        f"p50 {result.p50_ms:8.2f} ms p99 {result.p99_ms:8.2f} ms "
                        f"errors {result.errors}",
                        flush=True,
                    )
            if name.startswith("bnfold"):
                stats["peak_rss_mb"][name] = memory_mb(server.process.pid, "VmHWM")
                rows = {}
                for model in MODELS:
                    total, runs_count = metric_sum_count(server.url, "bnfold_run_batch_size", model)
                    rows[model] = total / runs_count if runs_count else float("nan")
                stats["rows_per_run"][name] = rows
    return points, stats


def bench_side_by_side(
    repository: Path, rounds: int = SIDE_BY_SIDE_ROUNDS, seconds: float = SIDE_BY_SIDE_SECONDS
) -> dict[str, dict[int, list[float]]]:
    """The headline point (digits MLP JSON) at 1 and 8 clients, bnfold and the empty handler
    both up and taking `seconds` turns for `rounds` rounds (side_by_side.py): the ratio
    the targets table judges, measured where a ratio is fair on this machine."""
    rates = alternating_turns(repository, SIDE_BY_SIDE_CLIENTS, rounds, seconds)
    for clients in SIDE_BY_SIDE_CLIENTS:
        summary = summarize(ratios(rates, clients))
        print(
            f"side by side, {clients} client(s): bnfold / empty median {summary.median:.2f} "
            f"(quartiles {summary.lower_quartile:.2f}-{summary.upper_quartile:.2f})",
            flush=True,
        )
    return rates


def bench_beside_limit(
    repository: Path, model: str, limit: InProcess, rounds: int = 5, seconds: float = 3.0
) -> dict[str, list[float]]:
    """The heavy model's targets measured side by side with in-process onnxruntime
    (side_by_side.against_in_process): `rounds` rounds of `seconds` turns."""
    return against_in_process(repository, model, limit, rounds, seconds)


def bench_startup(repeats: int = 3) -> dict[str, float]:
    """Start to ready on the default repository (converted, optimised graphs cached), and RSS."""
    ready, rss = [], []
    for _ in range(repeats):
        port = free_port()
        with serve("bnfold default repository", bnfold_command(None, port), port) as server:
            ready.append(server.ready_seconds)
            rss.append(memory_mb(server.process.pid, "VmRSS"))
    return {"ready_s": statistics.median(ready), "rss_mb": statistics.median(rss)}


def bench_workers(repository: Path) -> dict[str, float]:
    """`--workers 2` on the bench repository: memory of each worker process (RSS and PSS)."""
    port = free_port()
    with serve(
        "bnfold --workers 2", bnfold_command(repository, port, "--workers", "2"), port
    ) as server:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while len(children) < 2 and time.monotonic() < deadline:
            listed = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
            children = [  # uvicorn's workers, not multiprocessing's resource tracker
                int(pid)
                for pid in listed.read_text().split()
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            time.sleep(0.1)
        for _ in range(100):  # both workers loaded: the second answers too
            if all(memory_mb(pid, "VmRSS") > 100 for pid in children):
                break
            time.sleep(0.1)
        time.sleep(1.0)
        return {
            "supervisor_rss_mb": memory_mb(server.process.pid, "VmRSS"),
            "worker_rss_mb": statistics.mean(memory_mb(pid, "VmRSS") for pid in children),
            "worker_pss_mb": statistics.mean(memory_mb(pid, "Pss") for pid in children),
        }


ONE_BY_TWO = ("--threads", "1", "--concurrent-runs", "2")
TWO_BY_ONE = ("--threads", "2", "--concurrent-runs", "1")
TUNING: tuple[tuple[str, str, tuple[str, ...], str, str, tuple[int, ...]], ...] = (
    # (label, server, options, model, encoding, concurrency levels); every row spells out
    # the setting it varies, so the table keeps its meaning whatever the defaults are
    ("2 runs x 1 thread", "bnfold", ONE_BY_TWO, "resnet18", "binary", (1, 8)),
    ("1 run x 2 threads", "bnfold", TWO_BY_ONE, "resnet18", "binary", (1, 8)),
    (
        "2 runs x 2 threads",
        "bnfold",
        ("--threads", "2", "--concurrent-runs", "2"),
        "resnet18",
        "binary",
        (1, 8),
    ),
    (
        "1 run x 2 threads, spinning",
        "bnfold",
        (*TWO_BY_ONE, "--spinning"),
        "resnet18",
        "binary",
        (1, 8),
    ),
    (
        "1 run x 2 threads, no memory arena",
        "bnfold",
        (*TWO_BY_ONE, "--no-memory-arena"),
        "resnet18",
        "binary",
        (8,),
    ),
    (
        "1 run x 2 threads, parallel execution",
        "bnfold",
        (*TWO_BY_ONE, "--execution-mode", "parallel", "--inter-op-threads", "2"),
        "resnet18",
        "binary",
        (8,),
    ),
    ("2 runs x 1 thread", "bnfold", ONE_BY_TWO, "resnet18", "json", (8,)),
    ("1 run x 2 threads", "bnfold", TWO_BY_ONE, "resnet18", "json", (8,)),
    ("max_queue_delay_us 0", "bnfold", ("--max-queue-delay-us", "0"), "digits_mlp", "json", (1, 8)),
    (
        "max_queue_delay_us 500",
        "bnfold",
        ("--max-queue-delay-us", "500"),
        "digits_mlp",
        "json",
        (1, 8),
    ),
    (
        "max_queue_delay_us 2000",
        "bnfold",
        ("--max-queue-delay-us", "2000"),
        "digits_mlp",
        "json",
        (1, 8),
    ),
    (
        "batching off (max_batch_size 0)",
        "bnfold",
        ("--max-batch-size", "0"),
        "digits_mlp",
        "json",
        (8,),
    ),
    ("2 runs x 1 thread", "bnfold", ONE_BY_TWO, "digits_mlp", "json", (8,)),
    ("1 run x 2 threads", "bnfold", TWO_BY_ONE, "digits_mlp", "json", (8,)),
    ("bnfold --workers 2", "bnfold", ("--workers", "2"), "digits_mlp", "json", (8, 32)),
    ("empty handler --workers 2", "empty", ("--workers", "2"), "digits_mlp", "json", (8, 32)),
)


def bench_tuning(repository: Path, seconds: float) -> list[dict]:
    """Every TUNING row: bnfold (or the empty handler) with one setting changed."""
    rows = []
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    for label, kind, options, model, encoding, levels in TUNING:
        port = free_port()
        command = (
            bnfold_command(repository, port, *options)
            if kind == "bnfold"
            else [*empty_command(port), *options]
        )
        with serve(f"tune {label}", command, port) as server:
            url = f"{server.url}/v2/models/{model}/infer"
            check_answer(url, bodies[model][encoding])
            for clients in levels:
                result = load(url, bodies[model][encoding], clients, seconds)
                rows.append(
                    {"label": label, "model": model, "encoding": encoding, "concurrency": clients}
                    | asdict(result)
                )
                print(
                    f"tune {model:11s} {encoding:6s} {label:40s} c={clients:<3d} "
                    f"{result.rps:9.1f} req/s p50 {result.p50_ms:8.2f} ms "
                    f"p99 {result.p99_ms:8.2f} ms",
                    flush=True,
                )
    return rows
