"""What drift monitoring costs: bnfold with monitoring off and on (at several sample fractions),
side by side in one run, on the serving benchmark's two headline points.

Each round starts one fresh server per setting, all side by side (an idle one costs
nothing), and loads each point on every server in turn and then in the reverse order
(ABBA: a linear drift of the machine cancels); a setting's value in a round is the mean
of its two loads, and the ratios are paired within a round (on / off). Fresh processes
every round, because on this shared machine one process can stay faster than another
for its whole life.
Saves benchmarks/out/serve/drift_cost.json; `drift_report` renders its own section of
BENCHMARKS.md (tables and numbers only).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .harness import WORK, bnfold_command, free_port, serve
from .load import load, write_bodies
from report_section import Machine, replace_section

RESULTS = WORK / "drift_cost.json"
SECTION = "serve-drift-bench"
#: (model, encoding): the points the issue's cost target names.
POINTS = (("digits_mlp", "json"), ("resnet18", "binary"))
CLIENTS = 8
OFF = "off"
#: Largest drop of throughput monitoring may cost at the default fraction.
TARGET_DROP = 0.05


@dataclass
class DriftCost:
    fractions: list[float]
    default_fraction: float
    rounds: int
    seconds: float
    clients: int
    # "model encoding" -> setting ("off" or the fraction) -> req/s, one per round
    rates: dict[str, dict[str, list[float]]]
    # the same -> the server's CPU µs per request (every thread), one per round
    cpu_us: dict[str, dict[str, list[float]]]
    # "model encoding" -> fraction -> [requests measured, samples dropped], summed over rounds
    sampled: dict[str, dict[str, list[int]]]
    # model -> {"offer_ns": per request at the default fraction, "sample_ms": one
    # calibration.onnx run of one sample on one thread}, in-process
    in_process: dict[str, dict[str, float]]
    run: dict[str, str]
    machine: Machine


def _label(fraction: float) -> str:
    return f"{fraction:g}"


def _drift_counts(url: str, model: str) -> list[int]:
    with urllib.request.urlopen(f"{url}/v2/models/{model}/drift", timeout=30) as response:
        report = json.loads(response.read())
    return [report.get("requests_sampled", 0), report.get("dropped", 0)]


def in_process_costs(repository: Path, fraction: float) -> dict[str, dict[str, float]]:
    """The two parts of monitoring's cost, timed in-process with the service's own code:
    `DriftMonitor.offer` per request (every request pays it), and a calibration.onnx run
    of one sample on one thread (the worker's work per measured request)."""
    from bnfold.service.drift_monitor import DriftConfig, DriftMonitor
    from bnfold.service.repository import read_package, scan_repository
    from bnfold.service.sessions import SessionConfig, load_model

    costs = {}
    config = SessionConfig(providers=("CPUExecutionProvider",))
    for location in scan_repository(repository):
        model = load_model(read_package(location), config)
        assert model.calibration_session is not None, f"{location.name} has no calibration.onnx"
        shape = [1 if dim == -1 else dim for dim in model.inputs[0].shape]
        feeds = {model.inputs[0].name: np.random.default_rng(0).random(shape, np.float32)}
        monitor = DriftMonitor(DriftConfig(sample_fraction=fraction))  # no worker: queue only
        requests = 20_000
        started = time.perf_counter()
        for _ in range(requests):
            monitor.offer(model, feeds)
        offer_ns = (time.perf_counter() - started) / requests * 1e9
        session, outputs = model.calibration_session, list(model.calibration_outputs)
        runs = []
        for _ in range(10):
            started = time.perf_counter()
            session.run(outputs, feeds)
            runs.append(time.perf_counter() - started)
        costs[location.name] = {"offer_ns": offer_ns, "sample_ms": statistics.median(runs) * 1e3}
    return costs


def bench_drift_cost(
    repository: Path,
    seconds: float,
    rounds: int,
    fractions: Sequence[float],
    default_fraction: float,
    run: dict[str, str],
    machine: Machine,
) -> DriftCost:
    settings = [(OFF, ("--no-drift-monitoring",))] + [
        (_label(fraction), ("--drift-monitoring", "--drift-sample-fraction", _label(fraction)))
        for fraction in fractions
    ]
    bodies = {model: write_bodies(repository, model) for model, _ in POINTS}
    points = [f"{model} {encoding}" for model, encoding in POINTS]
    rates = {point: {label: [] for label, _ in settings} for point in points}
    cpu_us = {point: {label: [] for label, _ in settings} for point in points}
    sampled = {point: {label: [0, 0] for label, _ in settings[1:]} for point in points}
    for round_index in range(rounds):
        with ExitStack() as servers:
            started = {}
            for label, options in settings:  # fresh processes every round, side by side
                port = free_port()
                command = bnfold_command(repository, port, *options)
                started[label] = servers.enter_context(serve(f"drift {label}", command, port))
            for (model, encoding), point in zip(POINTS, points, strict=True):
                measured: dict[str, list[tuple[float, float]]] = {label: [] for label in started}
                ordered = list(started) if round_index % 2 == 0 else list(started)[::-1]
                for label in [*ordered, *ordered[::-1]]:  # ABBA: a linear drift cancels
                    server = started[label]
                    url = f"{server.url}/v2/models/{model}/infer"
                    result = load(
                        url, bodies[model][encoding], CLIENTS, seconds, server.process.pid
                    )
                    measured[label].append((result.rps, result.cpu_us))
                    print(
                        f"drift round {round_index + 1} {point:18s} monitoring {label:5s} "
                        f"{result.rps:9.1f} req/s p50 {result.p50_ms:8.2f} ms "
                        f"CPU {result.cpu_us:8.0f} µs/req errors {result.errors}",
                        flush=True,
                    )
                for label, pair in measured.items():
                    rates[point][label].append(statistics.mean(rps for rps, _ in pair))
                    cpu_us[point][label].append(statistics.mean(cpu for _, cpu in pair))
                for label in sampled[point]:
                    requests, dropped = _drift_counts(started[label].url, model)
                    sampled[point][label][0] += requests
                    sampled[point][label][1] += dropped
    in_process = in_process_costs(repository, default_fraction)
    return DriftCost(
        list(fractions),
        default_fraction,
        rounds,
        seconds,
        CLIENTS,
        rates,
        cpu_us,
        sampled,
        in_process,
        run,
        machine,
    )


def save(cost: DriftCost, path: Path = RESULTS) -> None:
    path.write_text(json.dumps(asdict(cost), indent=1))


def read(path: Path = RESULTS) -> DriftCost:
    saved = json.loads(path.read_text())
    return DriftCost(**{**saved, "machine": Machine(**saved["machine"])})


def paired_ratios(values: dict[str, list[float]], label: str) -> list[float]:
    """on / off, round by round."""
    return [on / off for on, off in zip(values[label], values[OFF], strict=True)]


def _versus(ratios: list[float]) -> str:
    return (
        f"{100 * statistics.median(ratios):.1f} % ("
        + ", ".join(f"{100 * ratio:.0f}" for ratio in ratios)
        + ")"
    )


def render(cost: DriftCost) -> str:
    run, machine = cost.run, cost.machine
    labels = [OFF, *(_label(fraction) for fraction in cost.fractions)]
    default = _label(cost.default_fraction)
    lines = [
        "## Serving: the cost of drift monitoring",
        "",
        machine.line(float(run["load_start"]), float(run["load_end"])),
        f"Command: `{run['command']}` ({cost.seconds:g} s a point after a 1 s warm-up, "
        f"{cost.clients} clients, load from {run['driver']}; {cost.rounds} rounds, each with "
        "fresh servers, one per setting side by side, loaded in turn and in the reverse "
        "order (ABBA)).",
        "",
        "bnfold with its defaults but for drift monitoring: off (`--no-drift-monitoring`), "
        "or on at each sample fraction (`--drift-sample-fraction`). Each request carries "
        "one sample. A round's value is the mean of the setting's two loads. *vs off*: the "
        "median over rounds of on / off, paired within a round "
        "(each round's ratio in brackets, %), for the throughput and for the server's CPU "
        "time per request (every thread; what monitoring adds whatever else the machine "
        "runs). *Measured / dropped*: the drift endpoint's measured requests and dropped "
        "samples at the end of each round, summed over the rounds.",
        "",
        "| point | monitoring | req/s by round | median req/s | throughput vs off "
        "| median CPU µs/req | CPU vs off | measured / dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point, by_setting in cost.rates.items():
        cpu = cost.cpu_us[point]
        for label in labels:
            rates = by_setting[label]
            if label == OFF:
                versus, cpu_versus, counts = "", "", ""
            else:
                versus = _versus(paired_ratios(by_setting, label))
                cpu_versus = _versus(paired_ratios(cpu, label))
                measured, dropped = cost.sampled[point][label]
                counts = f"{measured:,} / {dropped:,}"
            name = f"{label} (default)" if label == default else label
            lines.append(
                f"| {point}, {cost.clients} clients | {name} | "
                + ", ".join(f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" for rate in rates)
                + f" | {statistics.median(rates):,.1f} | {versus} | "
                f"{statistics.median(cpu[label]):,.0f} | {cpu_versus} | {counts} |"
            )
    parts = "; ".join(
        f"{model}: offer {costs['offer_ns']:,.0f} ns per request, a measured sample "
        f"{costs['sample_ms']:.2f} ms"
        for model, costs in cost.in_process.items()
    )
    lines += [
        "",
        f"In-process, with the service's code (fraction {default}): {parts} (one "
        "calibration.onnx run of one sample on one thread, what the worker does per "
        "measured request, at the lowest CPU priority).",
    ]
    lines += ["", "| target | goal | measured | verdict |", "|---|---|---|---|"]
    for point, by_setting in cost.rates.items():
        if default not in by_setting:
            continue
        ratios = paired_ratios(by_setting, default)
        drop = 1 - statistics.median(ratios)
        spread = f"rounds {100 * (1 - max(ratios)):.0f} to {100 * (1 - min(ratios)):.0f} %"
        verdict = (
            "met" if drop <= TARGET_DROP else f"missed by {100 * (drop - TARGET_DROP):.1f} points"
        )
        lines.append(
            f"| {point}, monitoring on at the default fraction {default} | throughput drop "
            f"≤ {100 * TARGET_DROP:.0f} % | {100 * drop:.1f} % ({spread}) | {verdict} |"
        )
    return "\n".join(lines)


def write_report(cost: DriftCost) -> None:
    replace_section(SECTION, render(cost))
