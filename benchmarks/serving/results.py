"""What one serving run measured, and its results.json: the report reads nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from report_section import Machine

MODELS = ("digits_mlp", "resnet18")


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_us: float = float("nan")  # server CPU per request, every thread
    loop_cpu_us: float = float("nan")  # of which the event-loop (main) thread

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class InProcess:
    best_samples_per_s: float
    best_batch: int
    best_layout: str
    p50_ms: dict[int, float]  # batch-1 latency by intra-op threads
    by_batch: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass
class Point:
    model: str
    server: str
    concurrency: int
    load: Load


@dataclass
class ServeResults:
    points: list[Point]
    limits: dict[str, InProcess]  # in-process onnxruntime by model
    startup: dict[str, float]
    stats: dict[str, dict]  # bnfold's peak RSS and mean rows per run, by server
    # the headline point's side-by-side turns: req/s by server and client count, in round order
    side_by_side: dict[str, dict[int, list[float]]]
    # the heavy model beside in-process onnxruntime, round by round (side_by_side.LIMIT_TURNS)
    beside_limit: dict[str, dict[str, list[float]]]
    workers: dict[str, float]
    tuning: list[dict]
    profile: dict[str, dict[str, float]]
    run: dict[str, str]  # command, duration, load driver, load averages
    machine: Machine


def save_results(results: ServeResults, path: Path) -> None:
    path.write_text(json.dumps(asdict(results), indent=1))


def _side_by_side(saved: dict) -> dict[str, dict[int, list[float]]]:
    """The side-by-side turns; a run saved before them had three fresh-server repeats of the
    8-client point ("repeats"), read as three rounds at 8 clients."""
    if "side_by_side" in saved:
        return {
            server: {int(clients): rates for clients, rates in by_clients.items()}
            for server, by_clients in saved["side_by_side"].items()
        }
    return {server: {8: rates} for server, rates in saved["repeats"].items()}


def read_results(path: Path, machine_now: Machine) -> ServeResults:
    """A saved run. One saved before the machine was recorded gets `machine_now`, which
    is what its report always said."""
    saved = json.loads(path.read_text())
    return ServeResults(
        points=[
            Point(point["model"], point["server"], point["concurrency"], Load(**point["load"]))
            for point in saved["points"]
        ],
        limits={
            model: InProcess(
                limit["best_samples_per_s"],
                limit["best_batch"],
                limit["best_layout"],
                {int(threads): ms for threads, ms in limit["p50_ms"].items()},
                {
                    layout: {int(batch): rate for batch, rate in rates.items()}
                    for layout, rates in limit["by_batch"].items()
                },
            )
            for model, limit in saved["limits"].items()
        },
        startup=saved["startup"],
        stats=saved["stats"],
        side_by_side=_side_by_side(saved),
        beside_limit=saved.get("beside_limit", {}),
        workers=saved["workers"],
        tuning=saved["tuning"],
        profile=saved["profile"],
        run=saved["run"],
        machine=Machine(**saved["machine"]) if "machine" in saved else machine_now,
    )
