"""The tiny-model gap, side by side: bnfold (digits MLP, V2 JSON, batch 1) against the empty
FastAPI handler, at 1 and 8 clients: both servers up together, taking turns.

This 2-vCPU VM drifts between fast and slow phases lasting seconds to minutes (the
empty handler alone ranged 4,000-12,000 req/s in one hour), so a ratio is only
fair between turns close in time: each round gives each server one short turn per
client count, in alternating order, and the ratio is taken per round. The idle
server uses no CPU meanwhile.

Uses the serving benchmark's own parts (benchmarks/serving: the bench repository, the
servers, wrk, the CPU per request read from /proc). Run from the repository root:

    .venv/bin/python benchmarks/tiny_gap_bench.py [--duration 2] [--rounds 10] [--bnfold-option=--no-grpc]

Prints req/s, p50, server CPU µs/req (all threads / event loop) per turn, for bnfold
the share of its runs made inline on the event loop (`bnfold_inline_runs_total`), and
per client count the ratios bnfold / empty by round with their median and quartiles.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

from serving.harness import (
    bnfold_command,
    empty_command,
    ensure_repository,
    free_port,
    metric_values,
    serve,
)
from serving.load import check_answer, load, write_bodies


def inline_share(base_url: str) -> tuple[float, float]:
    """bnfold's runs so far, and how many of them ran inline (its /metrics)."""
    runs, inline = metric_values(
        base_url, ["bnfold_run_batch_size_count", "bnfold_inline_runs_total"], "digits_mlp"
    )
    return runs, inline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per turn")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bnfold-option", action="append", default=[], help="extra serve option")
    arguments = parser.parse_args()
    repository = ensure_repository()
    body = write_bodies(repository, "digits_mlp")["json"]
    bnfold_port = free_port()
    empty_port = free_port(bnfold_port)
    commands = {
        "bnfold": (bnfold_command(repository, bnfold_port, *arguments.bnfold_option), bnfold_port),
        "empty": (empty_command(empty_port), empty_port),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as running:
        servers = {
            name: running.enter_context(serve(f"tiny-gap {name}", command, port))
            for name, (command, port) in commands.items()
        }
        for server in servers.values():  # a warm turn each, not counted
            url = f"{server.url}/v2/models/digits_mlp/infer"
            check_answer(url, body)
            load(url, body, max(arguments.clients), 1.0, server.process.pid)
        names = list(servers)
        for round_index in range(arguments.rounds):
            for clients in arguments.clients:
                for name in names if round_index % 2 == 0 else names[::-1]:
                    server = servers[name]
                    url = f"{server.url}/v2/models/digits_mlp/infer"
                    runs, inline = inline_share(server.url) if name == "bnfold" else (0, 0)
                    result = load(url, body, clients, arguments.duration, server.process.pid)
                    rates.setdefault((name, clients), []).append(result.rps)
                    share = ""
                    if name == "bnfold":
                        runs_now, inline_now = inline_share(server.url)
                        ran = max(1.0, runs_now - runs)
                        share = f", inline runs {100 * (inline_now - inline) / ran:.0f} %"
                    print(
                        f"round {round_index + 1} {name:6s} c={clients}: {result.rps:8.1f} req/s "
                        f"p50 {result.p50_ms:.2f} ms, CPU µs/req {result.cpu_us:.0f} "
                        f"(loop {result.loop_cpu_us:.0f}), errors {result.errors}{share}",
                        flush=True,
                    )
    for clients in arguments.clients:
        ratios = [
            bnfold / empty
            for bnfold, empty in zip(rates["bnfold", clients], rates["empty", clients], strict=True)
        ]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(
            f"c={clients}: bnfold / empty per round "
            + ", ".join(f"{ratio:.2f}" for ratio in ratios)
            + f"; median {statistics.median(ratios):.2f}"
            + f" (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})"
        )


if __name__ == "__main__":
    main()
