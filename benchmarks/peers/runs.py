"""One peer run: every server started side by side, checked, then loaded point by point,
the servers taking turns.

Interleaved so that the machine's drift (other work, thermal state) falls on every server
alike: for each point, each server in turn, then again in the reverse order (ABBA), for
as many rounds as asked. The servers start one at a time (start-to-ready is measured
alone), then stay up idle while the others are loaded, as in the drift comparison
(serving/drift_cost.py). The load is the serving benchmark's own (serving/load.py): the
same bodies, the same generators, a warm-up second and a checked request before and
after each point.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import grpc

from .checks import Check, check, reference_output, sample_of
from .results import Measured
from .servers import Ports, ServerKind, tree_memory_mb, wait_models_ready
from serving.harness import Server, serve
from serving.load import GRPC_SCHEME, load, write_bodies
from serving.results import MODELS

#: (model, encoding, clients): the points every server that serves them is loaded on.
POINTS = (
    ("digits_mlp", "json", 1),
    ("digits_mlp", "json", 8),
    ("resnet18", "json", 8),
    ("resnet18", "binary", 1),
    ("resnet18", "binary", 8),
    ("digits_mlp", "grpc", 8),
    ("resnet18", "grpc", 1),
    ("resnet18", "grpc", 8),
)
#: What the empty handler is loaded on: the HTTP ceiling for the tiny model's JSON body.
REFERENCE_ENCODINGS = (("digits_mlp", "json"),)
LOAD_FAILURES = (
    RuntimeError,
    OSError,
    urllib.error.URLError,
    subprocess.CalledProcessError,
    grpc.RpcError,
)


def _url(server: Server, ports: Ports, model: str, encoding: str) -> str:
    if encoding == "grpc":
        return f"{GRPC_SCHEME}127.0.0.1:{ports.grpc}"
    return f"{server.url}/v2/models/{model}/infer"


def bench_peers(
    repository: Path,
    kinds: Sequence[ServerKind],
    seconds: float,
    rounds: int,
    threads: int,
    points: Sequence[tuple[str, str, int]] = POINTS,
) -> tuple[list[Measured], list[Check], dict[str, float], dict[str, dict[str, float]]]:
    """(loads, checks, start-to-ready seconds, memory after the load), by server."""
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    expected = {
        model: reference_output(repository / model / "1", sample_of(bodies[model]["grpc"]), threads)
        for model in MODELS
    }
    checks: list[Check] = []
    ready_s: dict[str, float] = {}
    measured: list[Measured] = []
    with ExitStack() as stack:
        running: dict[str, tuple[Server, Ports]] = {}
        taken: list[int] = []
        for kind in kinds:
            ports = Ports.free(taken)
            taken += [ports.http, ports.grpc, ports.metrics]
            started = time.perf_counter()
            try:
                command = kind.command(repository, ports)
                server = stack.enter_context(serve(f"peers {kind.name}", command, ports.http))
                if kind.answers_models:
                    wait_models_ready(server.url, MODELS)
            except (RuntimeError, TimeoutError) as error:
                checks.append(Check(kind.name, "*", "*", False, f"did not start: {error}"))
                print(f"{kind.name}: did not start: {error}", flush=True)
                continue
            ready_s[kind.name] = time.perf_counter() - started
            running[kind.name] = (server, ports)
            print(f"{kind.name}: ready in {ready_s[kind.name]:.2f} s", flush=True)
        servable: set[tuple[str, str, str]] = set()
        for kind in kinds:
            if kind.name not in running:
                continue
            server, ports = running[kind.name]
            if not kind.answers_models:
                servable.update(
                    (kind.name, model, encoding) for model, encoding in REFERENCE_ENCODINGS
                )
                continue
            for model in MODELS:
                for encoding in kind.encodings:
                    url = _url(server, ports, model, encoding)
                    result = check(
                        kind.name, model, encoding, url, bodies[model][encoding], expected[model]
                    )
                    checks.append(result)
                    print(
                        f"check {kind.name:9s} {model:11s} {encoding:6s} "
                        f"{'ok' if result.ok else 'FAILED'}: {result.reason}",
                        flush=True,
                    )
                    if result.ok:
                        servable.add((kind.name, model, encoding))
        for model, encoding, clients in points:
            names = [kind.name for kind in kinds if (kind.name, model, encoding) in servable]
            for round_index in range(rounds):
                for name in names if round_index % 2 == 0 else names[::-1]:
                    if (name, model, encoding) not in servable:
                        continue  # failed under load earlier
                    server, ports = running[name]
                    url = _url(server, ports, model, encoding)
                    try:
                        result = load(url, bodies[model][encoding], clients, seconds)
                    except LOAD_FAILURES as error:
                        servable.discard((name, model, encoding))
                        reason = f"failed under load ({clients} clients): {error}"
                        checks.append(Check(name, model, encoding, False, reason))
                        print(f"{name} {model} {encoding}: {reason}", flush=True)
                        continue
                    measured.append(Measured(model, encoding, clients, name, round_index, result))
                    print(
                        f"{model:11s} {encoding:6s} c={clients:<2d} round {round_index} "
                        f"{name:14s} {result.rps:9.1f} req/s p50 {result.p50_ms:8.2f} ms "
                        f"p99 {result.p99_ms:8.2f} ms errors {result.errors}",
                        flush=True,
                    )
        memory = {name: tree_memory_mb(server.process.pid) for name, (server, _) in running.items()}
    return measured, checks, ready_s, memory
