"""Tail latency at one client: which requests are slow, and what the server was doing then.

One client sends the same ResNet-18 request (V2 JSON or binary tensors) again and
again to `bnfold serve` on the serving benchmark's repository; the server runs
with probes (`_serve_with_probes`) that log, on the system-wide monotonic clock
the client also reads, every onnxruntime run (which graph, on which thread),
every drift measurement, every malloc_trim and every garbage collection of the
oldest generation. A request is slow when it takes more than 1.5x the median; for
the slow ones the report counts what overlapped them.

Variants (servers started side by side, loaded in turn and in the reverse order
each round, ABBA, so machine noise lands on all of them): `--variants` names
from VARIANTS. Each prints p50 / p90 / p99 / max and p99/p50, pooled over the
rounds, and what overlapped its slow requests.

    python benchmarks/tail_bench.py --requests 400 --rounds 3 --encodings json binary

Each round also times the model's batch-1 runs called in this process, opened as
the service opens them (`--no-in-process` skips it), at the service's default thread
count and at one thread (`--in-process-threads`): the tail onnxruntime has on its own
on this machine, which no server can go below, and how many of its slow runs came in
stretches (next to another slow run: the machine slower for a while, not one run).

Noisy machines: compare the variants of one run, not runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

SLOW_RATIO = 1.5
#: "before": the service as it was (drift worker at nice 19, its calibration session on the
#: shared arena, no frozen start-up objects); "after": as it is, with the start-up
#: objects frozen when the drift worker starts, as the app's start-up should
#: (`heap.freeze_startup_objects`; a second freeze once it does is harmless).
BEFORE = ("--probe-drift-priority", "nice", "--probe-calibration-arena", "--probe-no-gc-freeze")
VARIANTS: dict[str, tuple[str, ...]] = {
    "before": BEFORE,
    "after": ("--probe-gc-freeze",),
    "before-no-drift": ("--no-drift-monitoring", "--probe-no-gc-freeze"),
    "after-no-drift": ("--no-drift-monitoring", "--probe-gc-freeze"),
    "no-trim": ("--probe-no-trim",),
    # the drift monitor without its CPU budget (as before it had one)
    "no-budget": ("--drift-cpu-budget", "0"),
    # one request in 500 measured instead of one in 100
    "drift-0.002": ("--drift-sample-fraction", "0.002"),
    # onnxruntime's threads spin between a run's parallel sections, and stop when it ends
    "spinning": ("--spinning",),
    # one onnxruntime thread per run: no second vCPU for a run to wait on (and a slower p50)
    "one-thread": ("--threads", "1"),
    # every request sampled: the worker's priority and arena, amplified
    "drift-all-before": ("--drift-sample-fraction", "1.0", "--drift-cpu-budget", "0", *BEFORE),
    "drift-all-after": ("--drift-sample-fraction", "1.0", "--drift-cpu-budget", "0"),
    "drift-all-normal": (
        "--drift-sample-fraction",
        "1.0",
        "--drift-cpu-budget",
        "0",
        "--probe-drift-priority",
        "normal",
    ),
}


# ---------------------------------------------------------------- the server side


def _serve_with_probes(events_path: str, argv: list[str]) -> None:
    """Run `bnfold serve argv` in this process with the probes installed."""
    import onnxruntime as ort

    from bnfold.service import batching, drift_monitor
    from bnfold.service.rest import bodies

    out = open(events_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    lock = threading.Lock()

    def log(kind: str, start: float, end: float, **extra: Any) -> None:
        with lock:
            out.write(json.dumps({"kind": kind, "start": start, "end": end, **extra}) + "\n")

    original_run = ort.InferenceSession.run

    def run(self: Any, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        return probed_run(functools.partial(original_run, self), output_names, feeds, run_options)

    def probed_run(runner: Any, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        start = time.monotonic()
        thread_start = time.thread_time()
        try:
            return runner(output_names, feeds, run_options)
        finally:
            rows = next(iter(feeds.values())).shape[0] if feeds else 0
            log(
                "run",
                start,
                time.monotonic(),
                graph="calibration"
                if threading.current_thread().name == "bnfold-drift"
                else "model",
                outputs=len(output_names or ()),
                rows=int(rows),
                thread=threading.current_thread().name,
                cpu=time.thread_time() - thread_start,
            )

    ort.InferenceSession.run = run  # type: ignore[method-assign]
    # the batcher runs a CPU session through its native run (sessions.session_runner),
    # which the class's run above never sees
    original_runner = batching.session_runner

    def session_runner(session: Any) -> Any:
        runner = original_runner(session)
        if getattr(runner, "__func__", None) is run:  # the class's run: probed already
            return runner
        return functools.partial(probed_run, runner)

    batching.session_runner = session_runner  # type: ignore[assignment]

    original_measure = drift_monitor.DriftMonitor._measure_group

    def measure(self: Any, group: Any) -> None:
        start = time.monotonic()
        try:
            original_measure(self, group)
        finally:
            log("drift", start, time.monotonic(), samples=len(group))

    drift_monitor.DriftMonitor._measure_group = measure  # type: ignore[method-assign]

    if "--probe-no-trim" in argv:
        argv.remove("--probe-no-trim")
        bodies.DecodeBudget.__init__.__defaults__ = (None,)
    elif bodies.MALLOC_TRIM is not None:
        trim_function = bodies.MALLOC_TRIM

        def trim(pad: int) -> int:
            start = time.monotonic()
            try:
                return trim_function(pad)
            finally:
                log("trim", start, time.monotonic())

        bodies.DecodeBudget.__init__.__defaults__ = (trim,)

    if "--probe-drift-priority" in argv:
        at = argv.index("--probe-drift-priority")
        priority = argv[at + 1]
        del argv[at : at + 2]
        if priority == "normal":
            drift_monitor._lowest_priority = lambda: None
        elif priority == "nice":
            drift_monitor._lowest_priority = lambda: os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), 19
            )

    if "--probe-calibration-arena" in argv:
        argv.remove("--probe-calibration-arena")
        from bnfold.service.sessions import SessionConfig

        for_calibration = SessionConfig.for_calibration

        def on_shared_arena(self: Any) -> Any:
            return dataclasses.replace(for_calibration(self), memory_arena=self.memory_arena)

        SessionConfig.for_calibration = on_shared_arena  # type: ignore[method-assign]

    if "--probe-no-gc-freeze" in argv:  # before the app imports it (once it calls it)
        argv.remove("--probe-no-gc-freeze")
        from bnfold.service import heap

        heap.freeze_startup_objects = lambda: 0

    if "--probe-gc-freeze" in argv:
        argv.remove("--probe-gc-freeze")
        from bnfold.service.heap import freeze_startup_objects

        start_worker = drift_monitor.DriftMonitor.start

        def start_and_freeze(self: Any) -> None:
            start_worker(self)
            now = time.monotonic()
            log("freeze", now, time.monotonic(), objects=freeze_startup_objects())

        drift_monitor.DriftMonitor.start = start_and_freeze  # type: ignore[method-assign]

    gc_started: dict[int, float] = {}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[info["generation"]] = time.monotonic()
        else:
            start = gc_started.pop(info["generation"], None)
            end = time.monotonic()
            if start is not None and (info["generation"] == 2 or end - start > 0.002):
                log("gc", start, end, generation=info["generation"], tracked=len(gc.get_objects()))

    gc.callbacks.append(on_gc)

    from bnfold.cli import main

    sys.argv = ["bnfold", "serve", *argv]
    main()


# ---------------------------------------------------------------- the client side


@dataclass
class Variant:
    name: str
    options: tuple[str, ...]
    events_path: Path
    latencies: dict[str, list[float]] = field(default_factory=dict)
    requests: dict[str, list[Request]] = field(default_factory=dict)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _load(url: str, body: Any, model: str, count: int) -> list[tuple[float, float]]:
    import httpx

    content = body.path.read_bytes()
    spans = []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            start = time.monotonic()
            response = client.post(
                f"{url}/v2/models/{model}/infer", content=content, headers=body.headers
            )
            end = time.monotonic()
            response.raise_for_status()
            spans.append((start, end))
    return spans


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _overlaps(
    span: tuple[float, float], events: list[dict[str, Any]], keep: Callable[[dict], bool]
) -> list[dict[str, Any]]:
    return [e for e in events if keep(e) and e["start"] < span[1] and e["end"] > span[0]]


@dataclass(frozen=True)
class Request:
    """One client request: its latency, its model.onnx run (wall and the calling thread's
    CPU), and the probes' events that overlapped it."""

    latency: float
    run_wall: float
    run_cpu: float
    overlapping: frozenset[str]


def _requests(events_path: Path, spans: list[tuple[float, float]]) -> list[Request]:
    events = _events(events_path)
    found = []
    for span in spans:
        runs = _overlaps(span, events, lambda e: e["kind"] == "run" and e["graph"] == "model")
        others = _overlaps(span, events, lambda e: e["kind"] not in ("run", "freeze"))
        kinds = {e["kind"] if e["kind"] != "gc" else f"gc{e['generation']}" for e in others}
        found.append(
            Request(
                span[1] - span[0],
                sum(r["end"] - r["start"] for r in runs),
                sum(r["cpu"] for r in runs),
                frozenset(kinds),
            )
        )
    return found


def _breakdown(requests: list[Request]) -> list[str]:
    """Median latency, run and time outside the run of the requests that overlapped each kind
    of event, against those that overlapped none; and what the slow ones overlapped."""
    median = statistics.median(r.latency for r in requests)
    groups: dict[str, list[Request]] = {"none": []}
    for request in requests:
        for kind in request.overlapping or {"none"}:
            groups.setdefault(kind, []).append(request)
    lines = []
    for kind, members in sorted(groups.items()):
        slow = sum(r.latency > SLOW_RATIO * median for r in members)
        lines.append(
            f"  overlapping {kind:8} n={len(members):4}  latency "
            f"{1000 * statistics.median(r.latency for r in members):6.1f}  run "
            f"{1000 * statistics.median(r.run_wall for r in members):6.1f} (cpu "
            f"{1000 * statistics.median(r.run_cpu for r in members):5.1f})  outside "
            f"{1000 * statistics.median(r.latency - r.run_wall for r in members):6.1f} ms;  "
            f"slow {slow}"
        )
    slow = [r for r in requests if r.latency > SLOW_RATIO * median]
    if slow:
        lines.append(
            f"  slow requests ({len(slow)}): extra over the median in the run "
            f"{1000 * statistics.median(r.run_wall for r in slow):.1f} ms, outside "
            f"{1000 * statistics.median(r.latency - r.run_wall for r in slow):.1f} ms (medians)"
        )
    return lines


def _in_process_runs(repository: Path, model: str, count: int, threads: int = 0) -> list[float]:
    """Seconds per batch-1 run of `model`'s model.onnx called here, in the order run, opened
    as the service opens it (same options, arena; `threads` intra-op threads, 0: the
    service's default): the tail onnxruntime has on its own."""
    import numpy as np

    from bnfold.package_format import EVAL_GRAPH
    from bnfold.service.external_data import NO_FILE
    from bnfold.service.sessions import SessionConfig, open_session
    from bnfold.service.settings import Settings

    from serving.harness import input_shape

    settings = Settings(device="cpu", intra_op_threads=threads)
    config = SessionConfig.from_settings(settings, ("CPUExecutionProvider",))
    graph = (repository / model / "1" / EVAL_GRAPH).read_bytes()
    session = open_session(graph, {NO_FILE: b""}, config)
    sample = np.random.default_rng(0).random(input_shape(repository, model), dtype=np.float32)
    feeds = {session.get_inputs()[0].name: sample}
    for _ in range(20):
        session.run(None, feeds)
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - start)
        time.sleep(0.001)  # a client's round trip between requests
    return seconds


def _slow_runs(seconds: list[float], ratio: float = SLOW_RATIO) -> tuple[int, int]:
    """(slow runs, slow runs next to another slow run) in `seconds`, runs in the order made.

    Slow: over `ratio` times the median. Slow runs that come one after another mean the
    machine was slower for a stretch (7-8 runs, a tenth of a second and more, when
    measured), not that single runs went wrong. On this project's 2-vCPU VM, a 2-thread
    run's slow stretches had its worker's CPU time up about 1.7x, while 1-thread runs in
    the same minutes had p99/p50 1.17-1.26 (BENCHMARKS.md, tail latency)."""
    median = statistics.median(seconds)
    slow = [value > ratio * median for value in seconds]
    neighboured = sum(
        1
        for index, is_slow in enumerate(slow)
        if is_slow
        and ((index > 0 and slow[index - 1]) or (index + 1 < len(slow) and slow[index + 1]))
    )
    return sum(slow), neighboured


def _threads(threads: int) -> str:
    return "default threads" if threads == 0 else f"{threads} thread{'s' * (threads > 1)}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":
        _serve_with_probes(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encodings", nargs="+", default=["json", "binary"])
    parser.add_argument("--variants", nargs="+", default=["before", "after"])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--warmup-requests", type=int, default=20)
    parser.add_argument(
        "--no-in-process",
        dest="in_process",
        action="store_false",
        help="skip the reference: the same model's runs called in this process, each round",
    )
    parser.add_argument(
        "--in-process-threads",
        type=int,
        nargs="+",
        default=[0, 1],
        help="the reference's intra-op threads, each in turn every round (0: the service's "
        "default, one run on every CPU)",
    )
    args = parser.parse_args()
    in_process: dict[int, list[float]] = (
        {threads: [] for threads in args.in_process_threads} if args.in_process else {}
    )

    from serving.harness import WORK, ensure_repository, free_port, serve
    from serving.load import write_bodies

    repository = ensure_repository()
    bodies = write_bodies(repository, args.model)
    variants = [
        Variant(name, VARIANTS[name], WORK / f"tail.{name}.events") for name in args.variants
    ]
    ports: list[int] = []
    with ExitStack() as stack:
        servers = {}
        for variant in variants:
            port = free_port(*ports)
            ports.append(port)
            command = [
                sys.executable,
                __file__,
                "_serve",
                str(variant.events_path),
                "--repository",
                str(repository),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--no-grpc",
                "--log-level",
                "warning",
                *variant.options,
            ]
            servers[variant.name] = stack.enter_context(
                serve(f"tail-{variant.name}", command, port)
            )
        for round_number in range(args.rounds):
            order = variants if round_number % 2 == 0 else variants[::-1]
            for threads in in_process:
                runs = _in_process_runs(repository, args.model, args.requests, threads)
                in_process[threads].extend(runs)
                ms = sorted(1000 * value for value in runs)
                print(
                    f"round {round_number + 1} -      onnxruntime, {_threads(threads):15} "
                    f"p50 {_percentile(ms, 0.5):6.1f}  p99 {_percentile(ms, 0.99):6.1f}  "
                    f"max {ms[-1]:6.1f} ms",
                    flush=True,
                )
            for encoding in args.encodings:
                for variant in order:
                    url = servers[variant.name].url
                    _load(url, bodies[encoding], args.model, args.warmup_requests)
                    spans = _load(url, bodies[encoding], args.model, args.requests)
                    variant.latencies.setdefault(encoding, []).extend(e - s for s, e in spans)
                    variant.requests.setdefault(encoding, []).extend(
                        _requests(variant.events_path, spans)
                    )
                    ms = sorted(1000 * (e - s) for s, e in spans)
                    print(
                        f"round {round_number + 1} {encoding:6} {variant.name:15} "
                        f"p50 {_percentile(ms, 0.5):6.1f}  p99 {_percentile(ms, 0.99):6.1f}  "
                        f"max {ms[-1]:6.1f} ms",
                        flush=True,
                    )
    print()
    print("| encoding | variant | requests | p50 ms | p90 ms | p99 ms | max ms | p99/p50 |")
    print("|---|---|---|---|---|---|---|---|")
    for encoding in args.encodings:
        for variant in variants:
            ms = [1000 * value for value in variant.latencies[encoding]]
            p50, p99 = _percentile(ms, 0.5), _percentile(ms, 0.99)
            print(
                f"| {encoding} | {variant.name} | {len(ms)} | {p50:.1f} | "
                f"{_percentile(ms, 0.9):.1f} | {p99:.1f} | {max(ms):.1f} | {p99 / p50:.2f} |"
            )
    for threads, runs in in_process.items():
        ms = [1000 * value for value in runs]
        p50, p99 = _percentile(ms, 0.5), _percentile(ms, 0.99)
        print(
            f"| (run alone) | onnxruntime in-process, {_threads(threads)} | {len(ms)} | "
            f"{p50:.1f} | {_percentile(ms, 0.9):.1f} | {p99:.1f} | {max(ms):.1f} | "
            f"{p99 / p50:.2f} |"
        )
    print()
    for threads, runs in in_process.items():
        # per round: a run of requests is one stretch of time; rounds are minutes apart
        slow = neighboured = 0
        for start in range(0, len(runs), args.requests):
            counts = _slow_runs(runs[start : start + args.requests])
            slow, neighboured = slow + counts[0], neighboured + counts[1]
        print(
            f"onnxruntime in-process, {_threads(threads)}: {slow} of {len(runs)} runs over "
            f"{SLOW_RATIO}x their round's median, {neighboured} of them next to another slow run"
        )
    print()
    for encoding in args.encodings:
        for variant in variants:
            print(f"{encoding} {variant.name}:")
            print("\n".join(_breakdown(variant.requests[encoding])))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
