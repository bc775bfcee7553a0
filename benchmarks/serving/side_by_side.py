"""bnfold and the empty handler side by side: both servers up together, taking short turns.

This 2-vCPU VM drifts between fast and slow phases lasting seconds to minutes (the
empty handler alone ranged 2,700-11,000 req/s in one hour), so a ratio of two
servers is only fair between turns close in time. Each round gives each server
one turn per client count, the order alternating from round to round, and the
ratio is taken per round; the idle server uses no CPU meanwhile. Starting a fresh
server per measurement put a pair's two turns 25 s apart and compared phases of
the machine as much as servers (BENCHMARKS.md, the tiny-model gap).

Used by `tiny_gap_bench.py` (which prints every turn) and by `serve_bench.py` (whose
targets table judges the digits MLP's JSON rate by these rounds' median ratio). The
same holds for a server against in-process onnxruntime (`against_in_process`): the
heavy model's targets compare the two in the same minute, round by round.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .harness import bnfold_command, empty_command, free_port, serve
from .in_process import LimitProbe
from .load import check_answer, load, write_bodies
from .results import InProcess, Load

BNFOLD, EMPTY = "bnfold JSON", "empty handler"


@dataclass(frozen=True)
class Turn:
    """One server's turn: its round, client count, load result, and the server's base URL."""

    round_index: int
    server: str
    clients: int
    load: Load
    url: str


@dataclass(frozen=True)
class RatioSummary:
    median: float
    lower_quartile: float
    upper_quartile: float


def alternating_turns(
    repository: Path,
    clients: Sequence[int],
    rounds: int,
    seconds: float,
    bnfold_options: Sequence[str] = (),
    before_turn: Callable[[str, str], object] | None = None,
    after_turn: Callable[[Turn, object], None] | None = None,
) -> dict[str, dict[int, list[float]]]:
    """Requests/s of each turn, by server (`BNFOLD`, `EMPTY`) and client count, in round
    order: the digits MLP's V2 JSON body, batch 1. Both answers are checked first, and
    each server gets an uncounted warm turn. `before_turn(server, url)` returns what
    `after_turn(turn, it)` gets (tiny_gap_bench reads bnfold's metrics around a turn)."""
    body = write_bodies(repository, "digits_mlp")["json"]
    bnfold_port = free_port()
    empty_port = free_port(bnfold_port)
    commands = {
        BNFOLD: (bnfold_command(repository, bnfold_port, *bnfold_options), bnfold_port),
        EMPTY: (empty_command(empty_port), empty_port),
    }
    rates: dict[str, dict[int, list[float]]] = {
        name: {count: [] for count in clients} for name in commands
    }
    with contextlib.ExitStack() as running:
        servers = {
            name: running.enter_context(serve(f"side by side {name}", command, port))
            for name, (command, port) in commands.items()
        }
        for server in servers.values():  # a warm turn each, not counted
            url = f"{server.url}/v2/models/digits_mlp/infer"
            check_answer(url, body)
            load(url, body, max(clients), 1.0, server.process.pid)
        names = list(servers)
        for round_index in range(rounds):
            for count in clients:
                for name in names if round_index % 2 == 0 else names[::-1]:
                    server = servers[name]
                    before = before_turn(name, server.url) if before_turn else None
                    url = f"{server.url}/v2/models/digits_mlp/infer"
                    result = load(url, body, count, seconds, server.process.pid)
                    rates[name][count].append(result.rps)
                    if after_turn is not None:
                        after_turn(Turn(round_index, name, count, result, server.url), before)
    return rates


def ratios(rates: dict[str, dict[int, list[float]]], clients: int) -> list[float]:
    """bnfold / the empty handler, round by round, at `clients`."""
    return [
        ours / theirs
        for ours, theirs in zip(rates[BNFOLD][clients], rates[EMPTY][clients], strict=True)
    ]


def summarize(values: Sequence[float]) -> RatioSummary:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return RatioSummary(statistics.median(values), quartiles[0], quartiles[2])


#: What `against_in_process` measures each round, by the key its results use.
LIMIT_TURNS = {
    "binary 8": "bnfold binary, 8 clients, req/s",
    "JSON 8": "bnfold JSON, 8 clients, req/s",
    "limit": "in-process onnxruntime's best, samples/s",
    "binary 1": "bnfold binary, 1 client, p50 ms",
    "JSON 1": "bnfold JSON, 1 client, p50 ms",
    "limit 1": "in-process onnxruntime, batch 1, p50 ms",
}


def against_in_process(
    repository: Path, model: str, limit: InProcess, rounds: int, seconds: float
) -> dict[str, list[float]]:
    """`model` served by bnfold and run by onnxruntime in this process, turn by turn
    (`LIMIT_TURNS`, the order alternating by round): the server's throughput and p50
    beside the limit measured in the same minute. The server idles during the in-process
    turns, and the in-process sessions during the server's."""
    bodies = write_bodies(repository, model)
    probe = LimitProbe(repository, model, limit)
    port = free_port()
    measured: dict[str, list[float]] = {key: [] for key in LIMIT_TURNS}
    with serve(f"{model} beside in-process", bnfold_command(repository, port), port) as server:
        url = f"{server.url}/v2/models/{model}/infer"
        for encoding in ("json", "binary"):
            check_answer(url, bodies[encoding])
        pid = server.process.pid

        def served(encoding: str, clients: int) -> float:
            result = load(url, bodies[encoding.lower()], clients, seconds, pid)
            return result.rps if clients > 1 else result.p50_ms

        turns = {
            "binary 8": lambda: served("binary", 8),
            "JSON 8": lambda: served("JSON", 8),
            "limit": lambda: probe.best_samples_per_s(seconds),
            "binary 1": lambda: served("binary", 1),
            "JSON 1": lambda: served("JSON", 1),
            "limit 1": lambda: probe.batch1_p50_ms(seconds),
        }
        for round_index in range(rounds):
            keys = list(turns) if round_index % 2 == 0 else list(turns)[::-1]
            for key in keys:
                measured[key].append(turns[key]())
            print(
                f"{model} beside in-process, round {round_index + 1}: "
                + ", ".join(f"{key} {measured[key][-1]:,.2f}" for key in LIMIT_TURNS),
                flush=True,
            )
    return measured
