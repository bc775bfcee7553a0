"""What one peer run measured, and its results.json: the report reads nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .checks import Check
from report_section import Machine
from serving.results import Load


@dataclass
class Measured:
    model: str
    encoding: str
    clients: int
    server: str
    round: int  # 0, 1, ...: the server order of odd rounds is reversed
    load: Load


@dataclass
class Peer:
    """A server's versions, what it ran with, and its notes: the fixes a peer needed to run
    at all, or what an ASGI server loses against `bnfold serve`."""

    versions: dict[str, str]
    settings: list[str]
    notes: list[str]


@dataclass
class PeerResults:
    measured: list[Measured]
    checks: list[Check]  # before the load; also any failure under it
    ready_s: dict[str, float]  # process start to every model ready, by server
    memory: dict[str, dict[str, float]]  # after the load: rss_mb, pss_mb, processes
    peers: dict[str, Peer]
    run: dict[str, str]  # command, duration, rounds, driver, load averages
    machine: Machine


def save_results(results: PeerResults, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(results), indent=1))


def read_results(path: Path) -> PeerResults:
    saved = json.loads(path.read_text())
    return PeerResults(
        measured=[
            Measured(**{**point, "load": Load(**point["load"])}) for point in saved["measured"]
        ],
        checks=[Check(**check) for check in saved["checks"]],
        ready_s=saved["ready_s"],
        memory=saved["memory"],
        peers={name: Peer(**peer) for name, peer in saved["peers"].items()},
        run=saved["run"],
        machine=Machine(**saved["machine"]),
    )
