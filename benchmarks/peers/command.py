"""What both side-by-side benchmarks' commands share (peers_bench.py,
asgi_servers_bench.py): their options, and measure, save, then print or write."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .environments import peers_directory
from .report import Section, render, write_report
from .results import PeerResults, read_results, save_results
from .runs import bench_peers
from .servers import ServerKind, Tuning, describe
from report_section import describe_machine
from serving.harness import ensure_repository
from serving.load import driver_description


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds a point")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; odd ones reversed")
    parser.add_argument("--peers-dir", type=Path, default=None, help="where the virtualenvs live")
    parser.add_argument("--servers", nargs="+", default=None, help="a subset, by name")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument(
        "--report-only", action="store_true", help="re-render from the last results"
    )
    return parser.parse_args()


def main(
    description: str,
    kinds: Callable[[Path], list[ServerKind]],
    points: Sequence[tuple[str, str, int]],
    results_path: Path,
    section: Section,
    packages: Sequence[str],
) -> None:
    """`kinds(peers_dir)` are the servers; all of them unless --servers names some."""
    arguments = parse(description)
    if arguments.report_only:
        write_report(read_results(results_path), section)
        return
    directory = peers_directory(arguments.peers_dir)
    repository = ensure_repository()
    tuning = Tuning.of_bnfold()
    selected = [
        kind
        for kind in kinds(directory)
        if arguments.servers is None or kind.name in arguments.servers
    ]
    servers = {kind.name: describe(kind, directory) for kind in selected}
    script = Path(sys.argv[0]).name
    run = {
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "duration": f"{arguments.duration:g}",
        "rounds": str(arguments.rounds),
        "driver": driver_description(),
        "load_start": f"{os.getloadavg()[0]:.2f}",
    }
    measured, checks, ready_s, memory = bench_peers(
        repository, selected, arguments.duration, arguments.rounds, tuning.threads, points
    )
    run["load_end"] = f"{os.getloadavg()[0]:.2f}"
    results = PeerResults(
        measured, checks, ready_s, memory, servers, run, describe_machine(packages)
    )
    save_results(results, results_path)
    if arguments.no_write:
        print(render(results, section))
    else:
        write_report(results, section)
