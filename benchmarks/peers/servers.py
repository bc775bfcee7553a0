"""How each server under test starts, what it speaks, and its process tree read from /proc.

Every server listens on 127.0.0.1 on ports handed out here. bnfold and the empty handler
are the serving benchmark's own commands (serving/harness.py); the peers are their
adapters (adapters/*.py) run by their own virtualenv's interpreter, with the thread count
and batching defaults read from bnfold's settings so every server runs the graph alike.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from .environments import ENVIRONMENTS, ensure_environment, installed_versions, interpreter
from .results import Peer
from serving.harness import (
    ROOT,
    START_TIMEOUT_SECONDS,
    bnfold_command,
    empty_command,
    free_port,
    memory_mb,
)

ADAPTERS = Path(__file__).resolve().parent / "adapters"
WORK = ROOT / "benchmarks" / "out" / "peers"
BNFOLD = "bnfold"
EMPTY = "empty handler"


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls, taken: Sequence[int]) -> Ports:
        http = free_port(*taken)
        grpc = free_port(*taken, http)
        return cls(http, grpc, free_port(*taken, http, grpc))


@dataclass(frozen=True)
class ServerKind:
    """A server under test: how to start it, what it speaks, and notes on it."""

    name: str
    command: Callable[[Path, Ports], list[str]]
    encodings: tuple[str, ...]  # what it claims to serve; the checks decide what it does
    answers_models: bool = True  # False for the empty handler: its answer is a constant
    notes: tuple[str, ...] = ()  # fixes it needed to run, or guarantees it lacks
    environment: str | None = None  # its virtualenv in environments.ENVIRONMENTS, or
    local_distributions: tuple[str, ...] = ()  # what it runs of this interpreter's packages
    settings: tuple[str, ...] = field(default=())  # what it runs with, for the report


@dataclass(frozen=True)
class Tuning:
    """bnfold's own defaults, which every peer is given: intra-op threads, batching."""

    threads: int
    max_batch_size: int
    max_queue_delay_us: int

    @classmethod
    def of_bnfold(cls) -> Tuning:
        from bnfold.service.settings import Settings

        settings = Settings()
        return cls(settings.session_threads, settings.max_batch_size, settings.max_queue_delay_us)


def kinds(peers_dir: Path) -> list[ServerKind]:
    """bnfold, the three peers (each given bnfold's own threads and batching) and the
    empty handler."""
    tuning = Tuning.of_bnfold()

    def adapter(peer: str, script: str, *options: str) -> Callable[[Path, Ports], list[str]]:
        def command(repository: Path, ports: Ports) -> list[str]:
            values = {"http": ports.http, "grpc": ports.grpc, "metrics": ports.metrics}
            numbers = [f"--{name}-port={values[name]}" for name in options]
            return [
                str(interpreter(peers_dir, peer)),
                str(ADAPTERS / script),
                f"--repository={repository}",
                f"--threads={tuning.threads}",
                *numbers,
                *extra.get(peer, ()),
            ]

        return command

    extra = {
        "mlserver": (f"--workdir={WORK / 'mlserver-models'}",),
        "pytriton": (
            f"--max-batch-size={tuning.max_batch_size}",
            f"--max-queue-delay-us={tuning.max_queue_delay_us}",
        ),
    }
    threads = f"onnxruntime {tuning.threads} intra-op threads, sequential, arena on, no spinning"
    return [
        ServerKind(
            BNFOLD,
            lambda repository, ports: bnfold_command(repository, ports.http, grpc_port=ports.grpc),
            ("json", "binary", "grpc"),
            local_distributions=("bnfold", "onnxruntime", "uvicorn"),
            settings=("`bnfold serve` defaults", threads),
        ),
        ServerKind(
            "PyTriton",
            adapter("pytriton", "pytriton_server.py", "http", "grpc", "metrics"),
            ("json", "binary", "grpc"),
            notes=(
                "LD_LIBRARY_PATH starts with the interpreter's libpython directory: the "
                "Python backend stub the wheel bundles links libpython3.x.so.1.0 from the "
                "library path, where it finds none or (on this machine) Debian's, not the "
                "running interpreter's",
            ),
            environment="pytriton",
            settings=(
                "Triton's C++ HTTP/gRPC front end, `@batch` function, dynamic batching "
                f"(max_batch_size {tuning.max_batch_size}, max_queue_delay_us "
                f"{tuning.max_queue_delay_us}, as bnfold)",
                threads,
            ),
        ),
        ServerKind(
            "MLServer",
            adapter("mlserver", "mlserver_server.py", "http", "grpc", "metrics"),
            ("json", "binary"),
            environment="mlserver",
            settings=(
                "custom `MLModel` runtime, MLServer's defaults (1 parallel inference worker "
                "process, adaptive batching off), `debug` off (no access log); its uvicorn "
                "runs h11 (pip's mlserver brings no httptools)",
                threads,
            ),
        ),
        ServerKind(
            "KServe",
            adapter("kserve", "kserve_server.py", "http"),
            ("json", "binary"),
            notes=(
                "the model sets a response id when the request has none (KServe 0.21 "
                "answers 500 to a V2 request without an `id`)",
                "REST bound to 127.0.0.1 by the adapter (KServe binds 0.0.0.0 in code); "
                "gRPC off (it binds [::])",
            ),
            environment="kserve",
            settings=(
                "`kserve.Model` with a plain `def predict` (KServe calls it on its event "
                "loop), `ModelServer` defaults, latency logging off, logs at WARNING",
                threads,
            ),
        ),
        ServerKind(
            EMPTY,
            lambda repository, ports: empty_command(ports.http),
            ("json",),
            answers_models=False,
            local_distributions=("fastapi", "uvicorn"),
            settings=("benchmarks/empty_server.py: reads the body, answers a constant",),
        ),
    ]


def describe(kind: ServerKind, directory: Path) -> Peer:
    """A server's versions (its virtualenv installed first, when it has one) and notes."""
    if kind.environment is None:
        versions = {name: version(name) for name in kind.local_distributions}
        return Peer(versions, list(kind.settings), list(kind.notes))
    environment = ENVIRONMENTS[kind.environment]
    python = ensure_environment(directory, environment)
    versions = installed_versions(python, environment.distributions)
    return Peer(versions, list(kind.settings), [*environment.install_fixes, *kind.notes])


def wait_models_ready(url: str, models: Sequence[str]) -> None:
    """Until every model answers ready: Triton's server is ready before PyTriton binds them."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    for model in models:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: {model} never became ready")
            time.sleep(0.01)


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (PyTriton's tritonserver and stubs,
    MLServer's inference worker), from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, []))
    return tree


def tree_memory_mb(root: int) -> dict[str, float]:
    """RSS (shared pages counted in every process) and PSS (shared pages split) summed over
    the process tree, and how many processes it has."""
    tree = process_tree(root)
    return {
        "rss_mb": sum(memory_mb(pid, "VmRSS") for pid in tree),
        "pss_mb": sum(memory_mb(pid, "Pss") for pid in tree),
        "processes": len(tree),
    }
