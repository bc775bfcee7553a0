"""The serving section of BENCHMARKS.md and benchmarks/serve_bench.png, from the results.

Tables, numbers, ratios, verdicts against the targets and the plot only. What the
numbers mean is written by a person after reading a run, in BENCHMARKS.md outside the
section's markers: no sentence here may depend on which targets a run met or missed.
"""

from __future__ import annotations

import statistics

from .harness import ROOT
from .results import MODELS, InProcess, Load, Point, ServeResults
from .side_by_side import BNFOLD, EMPTY, ratios, summarize
from report_section import replace_section

PLOT = ROOT / "benchmarks" / "serve_bench.png"
SECTION = "serve-bench"


def _find(points: list[Point], model: str, server: str, clients: int) -> Load:
    return next(
        point.load
        for point in points
        if (point.model, point.server, point.concurrency) == (model, server, clients)
    )


def targets(
    points: list[Point],
    limits: dict[str, InProcess],
    startup: dict[str, float],
    side_by_side: dict[str, dict[int, list[float]]],
    beside_limit: dict[str, dict[str, list[float]]],
) -> list[tuple[str, str, str, str]]:
    """(target, goal, measured, verdict) rows; the verdict says by how much a miss misses."""
    rows = []

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"missed: {miss}"

    for clients, share in ((8, 0.7), (1, 0.6)):
        per_round = ratios(side_by_side, clients) if clients in side_by_side[BNFOLD] else []
        if not per_round:
            continue
        summary = summarize(per_round)
        rate = statistics.median(side_by_side[BNFOLD][clients])
        floor = 3500 if clients == 8 else 0
        goal = f"≥ {100 * share:.0f} % of the empty handler, median of the side-by-side rounds"
        if floor:
            goal = f"≥ {floor:,} req/s and " + goal
        rows.append(
            (
                f"digits MLP, JSON, {clients} client{'s' if clients > 1 else ''}",
                goal,
                f"{rate:,.0f} req/s; {100 * summary.median:.0f} % of the empty handler "
                f"(quartiles {100 * summary.lower_quartile:.0f}-"
                f"{100 * summary.upper_quartile:.0f} %, {len(per_round)} rounds)",
                verdict(
                    rate >= floor and summary.median >= share,
                    f"{100 * (share - summary.median):.0f} points short"
                    if summary.median < share
                    else f"{floor - rate:,.0f} req/s short",
                ),
            )
        )
    beside = beside_limit.get("resnet18")
    for encoding, share in (("binary", 0.9), ("JSON", 0.5)):
        if beside:  # side by side: the median of the rounds' ratios
            per_round = [
                rate / limit
                for rate, limit in zip(beside[f"{encoding} 8"], beside["limit"], strict=True)
            ]
            summary = summarize(per_round)
            rate, limit = (
                statistics.median(beside[f"{encoding} 8"]),
                statistics.median(beside["limit"]),
            )
            measured = (
                f"{rate:.1f} samples/s beside {limit:.1f}: {100 * summary.median:.0f} % "
                f"(median of {len(per_round)} rounds, quartiles "
                f"{100 * summary.lower_quartile:.0f}-{100 * summary.upper_quartile:.0f} %)"
            )
            share_met = summary.median
        else:  # a run saved before the side-by-side rounds: the table's points
            limit = limits["resnet18"].best_samples_per_s
            rate = _find(points, "resnet18", f"bnfold {encoding}", 8).rps
            measured = f"{rate:.1f} samples/s = {100 * rate / limit:.0f} % of {limit:.1f}"
            share_met = rate / limit
        rows.append(
            (
                f"ResNet-18, {encoding}, 8 clients",
                f"≥ {100 * share:.0f} % of in-process onnxruntime's best samples/s",
                measured,
                verdict(share_met >= share, f"{100 * (share - share_met):.0f} points short"),
            )
        )
    for model in MODELS:
        for encoding, empty_server in (
            ("binary", "empty handler, binary body"),
            ("JSON", "empty handler"),
        ):
            empty = _find(points, model, empty_server, 1).p50_ms
            beside = beside_limit.get(model)
            if beside:
                over = statistics.median(
                    served - direct
                    for served, direct in zip(
                        beside[f"{encoding} 1"], beside["limit 1"], strict=True
                    )
                )
                served = statistics.median(beside[f"{encoding} 1"])
                direct = statistics.median(beside["limit 1"])
                how = f", median of {len(beside['limit 1'])} rounds side by side"
            else:
                served = _find(points, model, f"bnfold {encoding}", 1).p50_ms
                direct = min(limits[model].p50_ms.values())
                over, how = served - direct, ""
            rows.append(
                (
                    f"{model}, batch 1, 1 client: p50 ({encoding})",
                    "≤ 2 ms above in-process onnxruntime",
                    f"{served:.2f} ms vs {direct:.2f} ms (+{over:.2f} ms{how}; "
                    f"the empty handler answers this body in {empty:.2f} ms)",
                    verdict(over <= 2.0, f"{over - 2.0:.2f} ms over"),
                )
            )
    rows.append(
        (
            "start to ready, default repository",
            "≤ 2 s",
            f"{startup['ready_s']:.2f} s",
            verdict(startup["ready_s"] <= 2.0, f"{startup['ready_s'] - 2.0:.2f} s over"),
        )
    )
    rows.append(
        (
            "server RSS, default repository, ready",
            "≤ 200 MB",
            f"{startup['rss_mb']:.0f} MB",
            verdict(startup["rss_mb"] <= 200, f"{startup['rss_mb'] - 200:.0f} MB over"),
        )
    )
    return rows


def draw_plot(points: list[Point], limits: dict[str, InProcess]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = sorted(
        {point.server for point in points}, key=lambda name: (not name.startswith("bnfold"), name)
    )
    figure, axes = plt.subplots(len(MODELS), 2, figsize=(12, 4.2 * len(MODELS)))
    for row, model in enumerate(MODELS):
        throughput, tail = axes[row]
        for server in servers:
            mine = sorted(
                (point for point in points if (point.model, point.server) == (model, server)),
                key=lambda point: point.concurrency,
            )
            clients = [point.concurrency for point in mine]
            throughput.plot(clients, [point.load.rps for point in mine], marker="o", label=server)
            tail.plot(clients, [point.load.p99_ms for point in mine], marker="o", label=server)
        limit = limits[model].best_samples_per_s
        fastest = max(point.load.rps for point in points if point.model == model)
        if limit < 20 * fastest:
            throughput.axhline(
                limit, color="grey", linestyle="--", label="in-process onnxruntime, best batch"
            )
        else:  # a tiny model: the limit would flatten every server onto the axis
            throughput.set_title(f"{model}: throughput (in-process onnxruntime: {limit:,.0f}/s)")
        for axis, title, unit in (
            (throughput, "throughput", "samples/s (one sample per request)"),
            (tail, "p99 latency", "ms"),
        ):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(sorted({point.concurrency for point in points}))
            axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(unit)
            if not axis.get_title():
                axis.set_title(f"{model}: {title}")
            axis.grid(True, which="both", alpha=0.3)
        throughput.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)
    plt.close(figure)


def _side_by_side_line(side_by_side: dict[str, dict[int, list[float]]]) -> str:
    parts = []
    for clients in sorted(side_by_side[BNFOLD]):
        ours, theirs = side_by_side[BNFOLD][clients], side_by_side[EMPTY][clients]
        parts.append(
            f"at {clients} client{'s' if clients > 1 else ''}, bnfold "
            + ", ".join(f"{rate:,.0f}" for rate in ours)
            + "; the empty handler "
            + ", ".join(f"{rate:,.0f}" for rate in theirs)
            + "; bnfold / empty "
            + ", ".join(f"{ratio:.2f}" for ratio in ratios(side_by_side, clients))
        )
    return (
        "The headline point side by side (req/s, digits MLP JSON, round by round; both "
        "servers up, taking turns in alternating order, serving/side_by_side.py): "
        + "; ".join(parts)
        + "."
    )


def _memory_line(results: ServeResults) -> str:
    workers, stats = results.workers, results.stats
    largest = max(point.concurrency for point in results.points)
    return (
        f"Memory: `bnfold serve --workers 2` on the bench repository (digits MLP + ResNet-18): "
        f"each worker {workers['worker_rss_mb']:.0f} MB RSS, {workers['worker_pss_mb']:.0f} MB "
        f"PSS (shared pages split), the supervisor {workers['supervisor_rss_mb']:.0f} MB. "
        "Peak RSS of the one bnfold process under this benchmark (ResNet-18 batches of up "
        f"to {largest} images): "
        + ", ".join(f"{name} {mb:.0f} MB" for name, mb in stats["peak_rss_mb"].items())
        + ". Mean rows per onnxruntime run (what the batcher merged over the whole run): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{model} {rows:.1f}" for model, rows in by_model.items())
            for name, by_model in stats["rows_per_run"].items()
        )
        + "."
    )


def render(results: ServeResults) -> str:
    """The section between the markers."""
    run, machine = results.run, results.machine
    lines = [
        "## Serving: bnfold against a hand-written server, onnxruntime and an empty handler",
        "",
        machine.line(float(run["load_start"]), float(run["load_end"])),
        f"Command: `{run['command']}` ({run['duration']} s a point after a 1 s warm-up; "
        f"load from {run['driver']}, on the same {machine.cores} cores as the server).",
        "",
        "Every request carries one sample (batch 1), so requests/s = samples/s. bnfold runs "
        "with its defaults; the hand-written server is benchmarks/baseline_server.py "
        "(pydantic models, a sync handler, onnxruntime's default options, dict responses); "
        "the empty handler (benchmarks/empty_server.py) reads the body and returns a "
        "constant: the most one uvicorn + FastAPI process answers with that body.",
        "",
    ]
    for model in MODELS:
        limit = results.limits[model]
        lines += [
            f"### {model}",
            "",
            "| server | clients | req/s = samples/s | p50 ms | p99 ms | errors "
            "| server CPU µs/req: all threads (event loop) |",
            "|---|---|---|---|---|---|---|",
        ]
        for point in results.points:
            if point.model != model:
                continue
            result = point.load
            lines.append(
                f"| {point.server} | {point.concurrency} | {result.rps:,.1f} | "
                f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.errors} | "
                f"{result.cpu_us:,.0f} ({result.loop_cpu_us:,.0f}) |"
            )
        layouts = "; ".join(
            f"{layout}: " + ", ".join(f"b{batch} {rate:,.0f}" for batch, rate in rates.items())
            for layout, rates in limit.by_batch.items()
        )
        latency = ", ".join(
            f"{threads} thread(s) {ms:.2f} ms" for threads, ms in limit.p50_ms.items()
        )
        lines += [
            "",
            f"In-process onnxruntime (the limit): best {limit.best_samples_per_s:,.1f} samples/s "
            f"at batch {limit.best_batch}, {limit.best_layout}. Samples/s by batch: {layouts}. "
            f"Batch-1 p50 latency: {latency}.",
            "",
        ]
    lines += [
        "### Targets",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
        *(
            f"| {a} | {b} | {c} | {d} |"
            for a, b, c, d in targets(
                results.points,
                results.limits,
                results.startup,
                results.side_by_side,
                results.beside_limit,
            )
        ),
        "",
        _side_by_side_line(results.side_by_side),
        "",
        _memory_line(results),
        "",
    ]
    if results.tuning:
        lines += [
            "### How the defaults were chosen",
            "",
            "The same points with one setting changed (same run, same machine).",
            "",
            "| model | encoding | setting | clients | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {row['model']} | {row['encoding']} | {row['label']} | {row['concurrency']} | "
                f"{row['requests'] / row['seconds']:,.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
                for row in results.tuning
            ),
            "",
        ]
    if results.profile:
        profile = results.profile
        parts = list(dict.fromkeys(part for shares in profile.values() for part in shares))
        lines += [
            "### Where the time goes",
            "",
            "py-spy samples of the bnfold process at 8 clients (every thread, idle waits "
            "excluded), by the innermost frame naming a part, in % of the samples.",
            "",
            "| part | " + " | ".join(profile) + " |",
            "|---|" + "---|" * len(profile),
            *(
                f"| {part} | "
                + " | ".join(f"{shares.get(part, 0.0):.0f}" for shares in profile.values())
                + " |"
                for part in parts
            ),
            "",
        ]
    lines.append("![serving benchmark](benchmarks/serve_bench.png)")
    return "\n".join(lines)


def write_report(results: ServeResults) -> None:
    """The plot, and the section of BENCHMARKS.md between its markers."""
    draw_plot(results.points, results.limits)
    replace_section(SECTION, render(results))
