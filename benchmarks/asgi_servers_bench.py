"""ASGI servers benchmark: bnfold's own app, and the empty FastAPI handler, under uvicorn,
granian and hypercorn, side by side in one run: is the HTTP server the limit?

The same harness as the peer benchmark (benchmarks/peers/): the servers start one at a
time, answer a checked request per model, then take turns on each point in rounds
whose order reverses (MLP JSON at 1 and 8 clients). bnfold's app is built by
`create_app_from_env` (`BNFOLD_*` variables: the bench repository, gRPC off, logs at
WARNING) under plain uvicorn (httptools, uvloop), granian and hypercorn (uvloop
workers), one process each; `bnfold serve` itself (uvicorn with its guarded protocol,
gRPC off) is the baseline. granian and hypercorn come from a virtualenv outside the
repository that sees bnfold's own after its own packages (peers/environments.py), so
the app is the project's. Each server's notes say which of `bnfold serve`'s client
limits (service/http_protocol.py) it lacks.

Saves benchmarks/out/peers/asgi_results.json and writes its section of BENCHMARKS.md
and benchmarks/asgi_servers_bench.png.

    python benchmarks/asgi_servers_bench.py [--duration 8] [--rounds 2] [--servers granian ...]
    python benchmarks/asgi_servers_bench.py --report-only
"""

from __future__ import annotations

import functools
from pathlib import Path

from peers.command import main
from peers.environments import interpreter
from peers.report import Section
from peers.servers import WORK, Ports, ServerKind

from serving.harness import PYTHON, ROOT, bnfold_command

RESULTS = WORK / "asgi_results.json"
PACKAGES = ("onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "numpy")
POINTS = (("digits_mlp", "json", 1), ("digits_mlp", "json", 8))
ENVIRONMENT = "asgi-servers"
FACTORY = "bnfold.service.rest.app:create_app_from_env"
EMPTY_FACTORY = "empty_server:create_app"
#: What `bnfold serve` guards that a server running the bare app does not
#: (service/http_protocol.py, service/drain.py).
GUARDS = {
    "head": "the request-head cap and header-count limit (431)",
    "header timeout": "the header read timeout (408)",
    "body timeout": "the body read timeout (408)",
    "connections": "the connection limit (503 with Retry-After)",
    "drain": "the drain hooks (connections closed while draining, a request partly "
    "received finished at shutdown)",
}
SECTION = Section(
    "serve-asgi-servers-bench",
    "## Serving: bnfold's app under other ASGI servers",
    "bnfold's app (`create_app_from_env`, the bench repository, gRPC off) and the empty "
    "FastAPI handler (benchmarks/empty_server.py) under each server, one process each; "
    "`bnfold serve` (uvicorn with its guarded httptools protocol) is the baseline. Each "
    "request carries one MLP sample as V2 JSON.",
    ROOT / "benchmarks" / "asgi_servers_bench.png",
    "What each server ran, and what it lacks against `bnfold serve`",
    "lacks",
    "_What the ASGI server comparison means: to be written after a full run "
    "(`python benchmarks/asgi_servers_bench.py`)._",
)


def kinds(directory: Path) -> list[ServerKind]:
    binaries = interpreter(directory, ENVIRONMENT).parent

    def app_env(repository: Path) -> list[str]:
        return [
            "env",
            f"BNFOLD_REPOSITORY={repository}",
            "BNFOLD_GRPC=false",
            "BNFOLD_LOG_LEVEL=warning",
            f"PYTHONPATH={ROOT / 'benchmarks'}",  # for the empty handler's module
        ]

    def uvicorn(factory: str, repository: Path, ports: Ports) -> list[str]:
        return [
            *app_env(repository),
            PYTHON,
            "-m",
            "uvicorn",
            "--factory",
            factory,
            "--host=127.0.0.1",
            f"--port={ports.http}",
            "--loop=uvloop",
            "--http=httptools",
            "--no-access-log",
            "--log-level=warning",
        ]

    def granian(factory: str, repository: Path, ports: Ports) -> list[str]:
        return [
            *app_env(repository),
            str(binaries / "granian"),
            "--interface=asgi",
            "--factory",
            "--host=127.0.0.1",
            f"--port={ports.http}",
            "--workers=1",
            "--loop=uvloop",
            "--log-level=warning",
            "--no-access-log",
            factory,
        ]

    def hypercorn(factory: str, repository: Path, ports: Ports) -> list[str]:
        return [
            *app_env(repository),
            str(binaries / "hypercorn"),
            f"--bind=127.0.0.1:{ports.http}",
            "--worker-class=uvloop",
            "--workers=1",
            "--log-level=warning",
            f"{factory}()",
        ]

    granian_lacks = (
        GUARDS["head"] + "; granian bounds its HTTP/1 buffer (`--http1-buffer-size`) instead",
        GUARDS["header timeout"]
        + "; granian has `--http1-header-read-timeout` (30 s) instead, its answer unchecked",
        GUARDS["body timeout"],
        GUARDS["connections"] + "; granian's `--backpressure` bounds requests in flight",
        GUARDS["drain"],
    )
    hypercorn_lacks = (
        GUARDS["head"] + "; hypercorn caps an incomplete head at 16 KiB (h11) instead",
        GUARDS["header timeout"] + " and " + GUARDS["body timeout"] + " (its `read_timeout` "
        "is off by default)",
        GUARDS["connections"],
        GUARDS["drain"],
    )
    servers = (  # name, command, virtualenv, this interpreter's packages, settings, notes
        (
            "uvicorn",
            uvicorn,
            None,
            ("uvicorn", "httptools", "uvloop"),
            "plain uvicorn, httptools, uvloop",
            tuple(GUARDS.values()),
        ),
        ("granian", granian, ENVIRONMENT, (), "granian ASGI, 1 worker, uvloop", granian_lacks),
        ("hypercorn", hypercorn, ENVIRONMENT, (), "hypercorn, 1 uvloop worker", hypercorn_lacks),
    )
    baseline = ServerKind(
        "bnfold serve",
        lambda repository, ports: bnfold_command(repository, ports.http, "--no-grpc"),
        ("json",),
        local_distributions=("bnfold", "uvicorn", "httptools", "uvloop"),
        settings=("uvicorn, httptools with bnfold's guarded protocol, uvloop",),
    )
    apps, empties = [], []
    for name, command, environment, local, settings, notes in servers:
        apps.append(
            ServerKind(
                name,
                functools.partial(command, FACTORY),
                ("json",),
                notes=notes,
                environment=environment,
                local_distributions=local,
                settings=(settings,),
            )
        )
        empties.append(
            ServerKind(
                f"empty, {name}",
                functools.partial(command, EMPTY_FACTORY),
                ("json",),
                answers_models=False,
                environment=environment,
                local_distributions=local,
                settings=(f"the empty handler: {settings}",),
            )
        )
    return [baseline, *apps, *empties]


if __name__ == "__main__":
    main(__doc__.splitlines()[0], kinds, POINTS, RESULTS, SECTION, PACKAGES)
