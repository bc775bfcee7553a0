"""The tiny-model gap, side by side: bnfold (digits MLP, V2 JSON, batch 1) against the empty
FastAPI handler, at 1 and 8 clients: both servers up together, taking turns.

How the turns alternate, and why: benchmarks/serving/side_by_side.py, which the serving
benchmark's targets table uses too. Uses the serving benchmark's own parts (the bench
repository, the servers, wrk, the CPU per request read from /proc). Run from the
repository root:

    .venv/bin/python benchmarks/tiny_gap_bench.py [--duration 2] [--rounds 10] [--bnfold-option=--no-grpc]

Prints req/s, p50, server CPU µs/req (all threads / event loop) per turn, for bnfold
the share of its runs made inline on the event loop (`bnfold_inline_runs_total`), and
per client count the ratios bnfold / empty by round with their median and quartiles.
"""

from __future__ import annotations

import argparse

from serving.harness import ensure_repository, metric_values
from serving.side_by_side import BNFOLD, Turn, alternating_turns, ratios, summarize

_SHORT = {BNFOLD: "bnfold", "empty handler": "empty"}


def inline_share(base_url: str) -> tuple[float, float]:
    """bnfold's runs so far, and how many of them ran inline (its /metrics)."""
    runs, inline = metric_values(
        base_url, ["bnfold_run_batch_size_count", "bnfold_inline_runs_total"], "digits_mlp"
    )
    return runs, inline


def _before(server: str, url: str) -> tuple[float, float] | None:
    return inline_share(url) if server == BNFOLD else None


def _report(turn: Turn, before: tuple[float, float] | None) -> None:
    result = turn.load
    share = ""
    if before is not None:
        runs_now, inline_now = inline_share(turn.url)
        ran = max(1.0, runs_now - before[0])
        share = f", inline runs {100 * (inline_now - before[1]) / ran:.0f} %"
    print(
        f"round {turn.round_index + 1} {_SHORT[turn.server]:6s} c={turn.clients}: "
        f"{result.rps:8.1f} req/s p50 {result.p50_ms:.2f} ms, CPU µs/req {result.cpu_us:.0f} "
        f"(loop {result.loop_cpu_us:.0f}), errors {result.errors}{share}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per turn")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bnfold-option", action="append", default=[], help="extra serve option")
    arguments = parser.parse_args()
    rates = alternating_turns(
        ensure_repository(),
        arguments.clients,
        arguments.rounds,
        arguments.duration,
        arguments.bnfold_option,
        before_turn=_before,
        after_turn=_report,
    )
    for clients in arguments.clients:
        per_round = ratios(rates, clients)
        summary = summarize(per_round)
        print(
            f"c={clients}: bnfold / empty per round "
            + ", ".join(f"{ratio:.2f}" for ratio in per_round)
            + f"; median {summary.median:.2f}"
            + f" (quartiles {summary.lower_quartile:.2f}-{summary.upper_quartile:.2f})"
        )


if __name__ == "__main__":
    main()
