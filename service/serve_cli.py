"""`bnfold serve`: parse options into `Settings`, make sure there is something to serve, run uvicorn.

REST and the KServe V2 gRPC protocol (service/grpc/, on `--grpc-port`, Triton's
8001 by default) run in the one process the app's lifespan starts: uvicorn
serves REST, the lifespan starts and stops the gRPC server on the same event loop.

The options are generated from the `Settings` fields (`_option_parameters`):
names from the field (or its `OptionNames`), help from its description, and
its environment variable and default appended, so nothing here repeats a
setting. An option left out falls back to its `BNFOLD_*` environment
variable, then to the default. The serving process never imports torch: when
the embedded default repository is still empty, the converter builds it in a
child process (`bnfold models build`).

uvicorn runs on uvloop and httptools (when installed: uvicorn[standard] brings
both on Linux and macOS), with a capped request head (`uvicorn_options`, shared
with the test server: server_options.py). With `--workers N` > 1, uvicorn starts N processes
that each build the app from the environment (`create_app_from_env`), so the
resolved settings are exported as `BNFOLD_*` variables first; every worker
loads every model, so memory grows with N (README: Serving). The workers are
supervised by uvicorn's supervisor, but one that closes its own copy of the
listening socket on SIGTERM (`WorkerSupervisor`): each worker drains
(drain.py) and closes its copy, and then a new connection is refused, not
left in a queue nobody accepts from.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any, get_args

import typer
import uvicorn
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from bnfold.service.errors import DeviceUnavailable
from bnfold.service.grpc.server import grpc_address
from bnfold.service.providers import resolve_providers
from bnfold.service.repository import scan_repository
from bnfold.service.rest.app import configure_logging, create_app
from bnfold.service.server_options import uvicorn_options
from bnfold.service.settings import (
    DEFAULT_REPOSITORY,
    MIB,
    RENAMED,
    OptionNames,
    Settings,
    environment_variable,
    settings_environment,
)

logger = logging.getLogger("bnfold.service")

EPILOG = """Examples:

  bnfold serve                          the built-in digits models on 127.0.0.1:8000

  bnfold serve -r ./repo --port 9000    another repository, another port

  bnfold serve --device cpu --threads 2 --concurrent-runs 1

  bnfold serve --workers 2              two server processes (each loads every model)

  bnfold serve --max-batch-size 16 --max-queue-delay-us 1000

  BNFOLD_ADMIN_TOKEN=s3cret bnfold serve    enable load/unload (Bearer s3cret)

  bnfold serve --no-console             no web console at /ui (the API docs stay at /docs)

  bnfold serve --grpc-port 9001         gRPC on another port (--no-grpc: REST only)

  bnfold serve --otlp-endpoint http://collector:4318/v1/traces    OpenTelemetry spans

Then: open http://127.0.0.1:8000/ui/ (the web console), http://127.0.0.1:8000/docs (API
docs), or curl localhost:8000/v2/models/digits_mlp; tritonclient.grpc talks to localhost:8001
"""

BUILD_HINT = (
    "run `pip install 'bnfold[convert]'` and `bnfold models build` to build it, "
    "or serve another repository with --repository"
)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(_serve_command())


def _serve_command() -> Callable[..., None]:
    """`serve`, whose signature (what Typer turns into options) is `_option_parameters()`."""

    def serve(**options: Any) -> None:
        """Serve a model repository over the KServe V2 inference protocol (REST and gRPC)."""
        try:
            settings = settings_from_options(options)
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"])
                typer.echo(f"error: {field}: {error['msg']}", err=True)
            raise typer.Exit(2) from None
        start_server(settings)

    serve.__signature__ = inspect.Signature(_option_parameters())  # type: ignore[attr-defined]
    return serve


def start_server(settings: Settings) -> None:
    """Check the device and the repository (exit 2 with one line when unusable), then serve."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        providers = resolve_providers(settings.device)
        ensure_repository(settings.repository)
    except (RepositoryUnavailable, DeviceUnavailable) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logger.info(
        "bnfold serve: repository %s, device %s -> %s, gRPC %s",
        settings.repository,
        settings.device.value,
        ", ".join(providers),
        grpc_address(settings.host, settings.grpc_port) if settings.grpc else "off",
    )
    options = uvicorn_options(settings)
    if settings.workers == 1:
        uvicorn.run(create_app(settings, providers, owns_process=True), **options)
        return
    os.environ.update(settings_environment(settings))
    for former in RENAMED:  # resolved above: the workers need not warn again
        os.environ.pop(environment_variable(former), None)
    run_workers(
        uvicorn.Config(
            "bnfold.service.rest.app:create_app_from_env",
            factory=True,
            workers=settings.workers,
            **options,
        )
    )


def run_workers(config: uvicorn.Config) -> None:
    """`uvicorn.run` for `config.workers` > 1, with bnfold's supervisor (below)."""
    WorkerSupervisor(config, sockets=[config.bind_socket()]).run()


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor of `--workers` processes (it restarts a dead one), which on
    SIGTERM or SIGINT closes its own copy of the listening socket and passes SIGTERM on to
    the workers at once, and again on each later signal.

    uvicorn's kept that copy open until the workers had exited: once they had
    closed theirs, connections queued on it with nobody to accept them, and were
    reset when the supervisor exited. The workers keep their copies through their
    drain window, so closing this one changes nothing until they close. uvicorn's
    passes the signal on at its next poll (every 0.5 s) and once only, so a second
    SIGTERM did not reach the workers. SIGINT goes on as SIGTERM, as in uvicorn's:
    Ctrl-C in a terminal reaches the workers themselves (one process group), and a
    second SIGINT would make uvicorn drop the requests in flight.
    """

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self._signalled: set[int] = set()
        for exit_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(exit_signal, self._on_exit_signal)

    def _on_exit_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info(
            "%s: passed on to %d worker(s)", signal.Signals(signum).name, len(self.processes)
        )
        for listening in self.sockets:
            listening.close()
        for process in self.processes:
            self._terminate(process)
        self.should_exit.set()

    def _terminate(self, process: Process) -> None:
        if process.pid is not None and process.exitcode is None:
            os.kill(process.pid, signal.SIGTERM)
            self._signalled.add(process.pid)

    def terminate_all(self) -> None:
        """After the supervisor's loop: a worker started since the signal gets it too."""
        for process in self.processes:
            if process.pid not in self._signalled:
                self._terminate(process)


def settings_from_options(options: Mapping[str, Any]) -> Settings:
    """`Settings` from the options given: one left out (None) leaves its field to the
    environment, then the default. A former option name (`--executor-workers`) warns on
    stderr and stands for the current one, unless that is given too."""
    given = {field: value for field, value in options.items() if value is not None}
    for former, current in RENAMED.items():
        if former not in given:
            continue
        value = given.pop(former)
        old, new = _option_names(former)[0], _option_names(current)[0]
        outcome = f"ignored: {new} is given" if current in given else f"use {new}"
        typer.echo(f"warning: {old} is deprecated, {outcome}", err=True)
        given.setdefault(current, value)
    return Settings(**given)


def _option_names(field: str) -> tuple[str, ...]:
    """A field's option names: its `OptionNames`, else the name in kebab case, with its
    negation for a flag; a former name of `RENAMED` (no field) gets the kebab-case name."""
    info = Settings.model_fields.get(field)
    for metadata in info.metadata if info is not None else ():
        if isinstance(metadata, OptionNames):
            return metadata.names
    name = field.replace("_", "-")
    if info is not None and info.annotation is bool:
        return (f"--{name}/--no-{name}",)
    return (f"--{name}",)


def _option_parameters() -> list[inspect.Parameter]:
    """One option per `Settings` field, each former name (`RENAMED`) after its field's.

    Every default is None, "not given", so the environment and the field's default
    still apply; the help shows them instead.
    """
    former_names: dict[str, list[str]] = {}
    for former, current in RENAMED.items():
        former_names.setdefault(current, []).append(former)
    parameters = []
    for field, info in Settings.model_fields.items():
        kind = _option_type(info)
        parameters.append(_option(field, kind, _option_names(field), _help(field, info)))
        for former in former_names.get(field, ()):
            parameters.append(_option(former, kind, _option_names(former), _former_help(former)))
    return parameters


def _help(field: str, info: FieldInfo) -> str:
    variable, default = environment_variable(field), _default_text(field, info)
    return f"{info.description} (env {variable}; default {default})"


def _former_help(former: str) -> str:
    current = RENAMED[former]
    use = f"{_option_names(current)[0]} (env {environment_variable(current)})"
    return f"Deprecated, as is {environment_variable(former)}: use {use}."


def _option(name: str, kind: Any, names: tuple[str, ...], help_text: str) -> inspect.Parameter:
    option = typer.Option(None, *names, help=help_text, show_default=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
    )


def _option_type(info: FieldInfo) -> Any:
    """The field's type on the command line: without None, and a secret as plain text."""
    kind = next(
        (arg for arg in get_args(info.annotation) if arg is not type(None)), info.annotation
    )
    return str if kind is SecretStr else kind


def _default_text(field: str, info: FieldInfo) -> str:
    """The field's default as the help shows it: on/off, 64 MiB, unset."""
    default = info.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, Enum):
        return str(default.value)
    if isinstance(default, float):
        return f"{default:g}"
    if field.endswith("_bytes") and default:
        for unit, size in (("MiB", MIB), ("KiB", 1 << 10)):
            if default % size == 0:
                return f"{default // size} {unit}"
    return str(default)


class RepositoryUnavailable(Exception):
    """Nothing to serve: a missing repository, or a default one that cannot be built."""


def ensure_repository(repository: Path) -> None:
    """Check `repository` is a directory; build the embedded default one when it holds no package.

    The build runs `bnfold models build` in a child process: it imports torch,
    and this process must not.
    """
    exists = _directory_exists(repository)
    is_default = repository.resolve() == DEFAULT_REPOSITORY.resolve()
    if not is_default:
        if not exists:
            raise RepositoryUnavailable(f"model repository {repository} does not exist")
        return
    if exists and scan_repository(repository):
        return
    logger.info("the embedded repository %s is empty: building it (once)", repository)
    command = [sys.executable, "-m", "bnfold", "models", "build", "--repository", str(repository)]
    if subprocess.run(command, check=False).returncode != 0:
        raise RepositoryUnavailable(f"building the embedded repository failed; {BUILD_HINT}")
    if not scan_repository(repository):
        raise RepositoryUnavailable(f"the embedded repository {repository} is empty; {BUILD_HINT}")


def _directory_exists(repository: Path) -> bool:
    """True for a directory, False when nothing is there (the default may still be built).

    Anything else -- a file, a path below a file, a symlink loop, a name too
    long -- raises `RepositoryUnavailable`: `bnfold serve` must answer with one
    line and exit 2, not with the traceback of `Path.resolve` or `Path.is_dir`.
    """
    try:
        mode = repository.stat().st_mode
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        blocking = next(
            (parent for parent in repository.parents if parent.exists() and not parent.is_dir()),
            None,
        )
        reason = f"{blocking} is not a directory" if blocking else "a parent is not a directory"
        raise RepositoryUnavailable(
            f"model repository {repository} does not exist: {reason}"
        ) from None
    except OSError as exc:
        raise RepositoryUnavailable(
            f"model repository {repository} cannot be opened: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(mode):
        raise RepositoryUnavailable(f"model repository {repository} is not a directory")
    return True
