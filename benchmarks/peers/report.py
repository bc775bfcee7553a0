"""A section of BENCHMARKS.md and its plot, from the saved results of a run of servers
side by side: the peer comparison (peers_bench.py) and the ASGI servers comparison
(asgi_servers_bench.py) render the same way, each with its own `Section`.

Tables, numbers, versions and notes (fixes, lost guarantees) only. What the numbers mean is for a person to write
after reading a full run, below the section's markers: the render that creates the
section leaves a placeholder line there, which no later render touches.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checks import ATOL, RTOL
from .results import Measured, PeerResults
from report_section import BENCHMARKS_MD, replace_section
from serving.harness import ROOT


@dataclass(frozen=True)
class Section:
    marker: str  # the name in the section's markers
    heading: str
    intro: str  # what the servers are and how they were compared
    plot: Path
    notes_heading: str  # what the servers' notes are, as a heading
    note_label: str  # and as each note's first word: "fix", "loses"
    placeholder: str  # below the section when it is created, for a person's reading


PEERS = Section(
    "serve-peers-bench",
    "## Serving: bnfold against the servers a user would pick instead",
    "Every server serves the same model.onnx files (benchmarks/out/serve/repository) "
    "through onnxruntime with the same session options and intra-op threads as bnfold; "
    "each request carries one sample, so requests/s = samples/s. Before any load each "
    "server answered one request per model and encoding, compared with onnxruntime in "
    "the benchmark's process; ✗: it failed (reason below), not benchmarked; —: not "
    "offered or not measured.",
    ROOT / "benchmarks" / "peers_bench.png",
    "What each server ran, and the fixes it needed",
    "fix",
    "_What the peer comparison means: to be written after a full run (`make bench-peers`)._",
)
LABELS = {
    "digits_mlp": "MLP",
    "resnet18": "ResNet-18",
    "json": "JSON",
    "binary": "binary",
    "grpc": "gRPC",
}


def _label(model: str, encoding: str, clients: int) -> str:
    return f"{LABELS[model]} {LABELS[encoding]} c={clients}"


def _points(results: PeerResults) -> list[tuple[str, str, int]]:
    """The points loaded, in the order of the run."""
    return list(dict.fromkeys((m.model, m.encoding, m.clients) for m in results.measured))


def _servers(results: PeerResults) -> list[str]:
    return list(dict.fromkeys([*results.peers, *(point.server for point in results.measured)]))


def _loads(results: PeerResults, server: str, point: tuple[str, str, int]) -> list[Measured]:
    return sorted(
        (
            measured
            for measured in results.measured
            if (measured.model, measured.encoding, measured.clients, measured.server)
            == (*point, server)
        ),
        key=lambda measured: measured.round,
    )


def _failure(results: PeerResults, server: str, model: str, encoding: str) -> str | None:
    for check in results.checks:
        if (
            check.server == server
            and not check.ok
            and (check.model, check.encoding)
            in (
                (model, encoding),
                ("*", "*"),
            )
        ):
            return check.reason
    return None


def _cells(
    results: PeerResults,
    server: str,
    points: list[tuple[str, str, int]],
    value: Callable[[list[Measured]], str],
) -> list[str]:
    """A table row's cells: `value` of the point's loads, ✗ when the server failed its
    check there, — when it does not serve it."""
    cells = []
    for point in points:
        loads = _loads(results, server, point)
        if loads:
            cells.append(value(loads))
        else:
            cells.append("✗" if _failure(results, server, point[0], point[1]) else "—")
    return cells


def _rates(loads: list[Measured]) -> str:
    return " / ".join(f"{measured.load.rps:,.1f}" for measured in loads)


def _latency(loads: list[Measured]) -> str:
    errors = sum(measured.load.errors for measured in loads)
    return (
        f"{statistics.mean(measured.load.p50_ms for measured in loads):.2f} / "
        f"{statistics.mean(measured.load.p99_ms for measured in loads):.2f}"
        + (f", {errors} errors" if errors else "")
    )


def render(results: PeerResults, section: Section) -> str:
    """The section between the markers."""
    run, machine = results.run, results.machine
    servers = _servers(results)
    points = _points(results)
    head = "| server | " + " | ".join(_label(*point) for point in points)
    lines = [
        section.heading,
        "",
        machine.line(float(run["load_start"]), float(run["load_end"])),
        f"Command: `{run['command']}` ({run['duration']} s a point after a 1 s warm-up, "
        f"{run['rounds']} rounds, the server order reversed every other round; load from "
        f"{run['driver']}, on the same {machine.cores} cores as the servers).",
        "",
        section.intro,
        "",
        "### Requests/s, one value per round",
        "",
        head + " | start to ready s | RSS after load MB (PSS, processes) |",
        "|---|" + "---|" * (len(points) + 2),
    ]
    for server in servers:
        cells = _cells(results, server, points, _rates)
        ready = results.ready_s.get(server)
        memory = results.memory.get(server)
        ready_cell = f"{ready:.2f}" if ready is not None else "—"
        memory_cell = (
            f"{memory['rss_mb']:.0f} ({memory['pss_mb']:.0f}, {memory['processes']:.0f})"
            if memory
            else "—"
        )
        lines.append(f"| {server} | " + " | ".join(cells) + f" | {ready_cell} | {memory_cell} |")
    lines += [
        "",
        "### Latency: p50 / p99 ms (mean of the rounds), errors",
        "",
        head + " |",
        "|---|" + "---|" * len(points),
    ]
    for server in servers:
        cells = _cells(results, server, points, _latency)
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    failures = [check for check in results.checks if not check.ok]
    passed = [check for check in results.checks if check.ok]
    lines += ["", "### Answers checked before the load", ""]
    if passed:
        worst = max(passed, key=lambda check: check.max_abs_diff)
        where = f", {worst.server} {worst.model} {worst.encoding}" if worst.max_abs_diff > 0 else ""
        lines.append(
            f"{len(passed)} server/model/encoding answers matched in-process onnxruntime "
            f"(tolerance {RTOL:g} relative + {ATOL:g} absolute; largest |difference| "
            f"{worst.max_abs_diff:.3g}{where}). " + ("Failed:" if failures else "None failed.")
        )
    lines += [f"- {c.server}, {c.model}, {c.encoding}: {c.reason}" for c in failures]
    lines += ["", f"### {section.notes_heading}", ""]
    for server, peer in results.peers.items():
        versions = ", ".join(f"{name} {number}" for name, number in peer.versions.items())
        lines.append(f"- **{server}** ({versions}): " + "; ".join(peer.settings) + ".")
        lines += [f"  - {section.note_label}: {note}" for note in peer.notes]
    lines += ["", f"![{section.marker}](benchmarks/{section.plot.name})"]
    return "\n".join(lines)


def draw_plot(results: PeerResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = _servers(results)
    points = _points(results)
    panels = len(points) + 1
    columns = 3
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = {server: f"C{index}" for index, server in enumerate(servers)}
    for axis, point in zip(axes.flat, points, strict=False):  # spare panels hidden below
        for index, server in enumerate(servers):
            loads = _loads(results, server, point)
            if not loads:
                if _failure(results, server, point[0], point[1]):
                    axis.text(index, 0, "✗", ha="center", va="bottom", color=colours[server])
                continue
            rates = [measured.load.rps for measured in loads]
            axis.bar(index, statistics.mean(rates), color=colours[server])
            axis.plot([index] * len(rates), rates, "k.", markersize=4)
        axis.set_title(_label(*point), fontsize=10)
        axis.set_xticks(range(len(servers)), servers, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("requests/s")
        axis.grid(True, axis="y", alpha=0.3)
    memory_axis = axes.flat[len(points)]
    measured_servers = [server for server in servers if server in results.memory]
    for index, server in enumerate(measured_servers):
        memory = results.memory[server]
        memory_axis.bar(index, memory["rss_mb"], color=colours[server], alpha=0.45)
        memory_axis.bar(index, memory["pss_mb"], color=colours[server])
    memory_axis.set_xticks(
        range(len(measured_servers)), measured_servers, rotation=30, ha="right", fontsize=8
    )
    memory_axis.set_title("memory after load: PSS (RSS light)", fontsize=10)
    memory_axis.set_ylabel("MB, process tree")
    for axis in list(axes.flat)[panels:]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(results: PeerResults, section: Section, markdown: Path = BENCHMARKS_MD) -> None:
    """The plot, the section between its markers, and, when the section is new, the
    placeholder for a person's reading below it."""
    draw_plot(results, section.plot)
    start, end = f"<!-- {section.marker}:start -->", f"<!-- {section.marker}:end -->"
    new = start not in (markdown.read_text() if markdown.exists() else "")
    replace_section(section.marker, render(results, section), markdown)
    if new:
        text = markdown.read_text().replace(end, f"{end}\n\n{section.placeholder}", 1)
        markdown.write_text(text)
