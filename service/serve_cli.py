"""`bnfold serve`: parse options into `Settings`, make sure there is something to serve, run uvicorn.

Every `Settings` field is an option here; an option left out falls back to its
`BNFOLD_*` environment variable, then to the default. The serving process never
imports torch: when the embedded default repository is still empty, the
converter builds it in a child process (`bnfold models build`).

uvicorn runs on uvloop and httptools (when installed: uvicorn[standard] brings
both on Linux and macOS), with a capped request head (`uvicorn_options`, shared
with the test server: server_options.py). With `--workers N` > 1, uvicorn starts N processes
that each build the app from the environment (`create_app_from_env`), so the
resolved settings are exported as `BNFOLD_*` variables first; every worker
loads every model, so memory grows with N (README: Serving).
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer
import uvicorn
from pydantic import ValidationError

from bnfold.models import DEFAULT_REPOSITORY
from bnfold.service.app import configure_logging, create_app
from bnfold.service.errors import DeviceUnavailable
from bnfold.service.providers import resolve_providers
from bnfold.service.repository import scan_repository
from bnfold.service.server_options import uvicorn_options
from bnfold.service.sessions import ExecutionMode
from bnfold.service.settings import Device, LogLevel, Settings

logger = logging.getLogger("bnfold.service")

EPILOG = """Examples:

  bnfold serve                          the built-in digits models on 127.0.0.1:8000

  bnfold serve -r ./repo --port 9000    another repository, another port

  bnfold serve --device cpu --threads 2 --executor-workers 1

  bnfold serve --workers 2              two server processes (each loads every model)

  bnfold serve --max-batch-size 16 --max-queue-delay-us 1000

  BNFOLD_ADMIN_TOKEN=s3cret bnfold serve    enable load/unload (Bearer s3cret)

Then: curl localhost:8000/v2/models/digits_mlp ; API docs at http://127.0.0.1:8000/docs
"""

BUILD_HINT = (
    "run `pip install 'bnfold[convert]'` and `bnfold models build` to build it, "
    "or serve another repository with --repository"
)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(serve)


def serve(
    repository: Path | None = typer.Option(
        None,
        "--repository",
        "-r",
        help="Model repository (REPO/NAME/VERSION). (env BNFOLD_REPOSITORY; "
        "default: the embedded repository, built on first use)",
        show_default=False,
    ),
    host: str | None = typer.Option(
        None, help="Interface to listen on. (env BNFOLD_HOST; default 127.0.0.1)"
    ),
    port: int | None = typer.Option(
        None, help="TCP port, 0 for any free one. (env BNFOLD_PORT; default 8000)"
    ),
    device: Device | None = typer.Option(
        None,
        help="auto: CUDA when onnxruntime-gpu sees a GPU, else CPU; cuda: fail when it "
        "cannot. (env BNFOLD_DEVICE; default auto)",
    ),
    intra_op_threads: int | None = typer.Option(
        None,
        "--threads",
        "--intra-op-threads",
        help="onnxruntime threads per session run; 0 = CPUs / executor workers. "
        "(env BNFOLD_INTRA_OP_THREADS; default 0: one run on every CPU)",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        help="uvicorn worker processes; each loads every model, so memory grows with it. "
        "(env BNFOLD_WORKERS; default 1)",
    ),
    executor_workers: int | None = typer.Option(
        None,
        "--executor-workers",
        help="Concurrent session runs per process; 0 = CPUs / threads. "
        "(env BNFOLD_EXECUTOR_WORKERS; default 0)",
    ),
    inter_op_threads: int | None = typer.Option(
        None,
        "--inter-op-threads",
        help="onnxruntime inter-op threads, parallel mode only. "
        "(env BNFOLD_INTER_OP_THREADS; default 1)",
    ),
    execution_mode: ExecutionMode | None = typer.Option(
        None,
        "--execution-mode",
        help="onnxruntime execution mode. (env BNFOLD_EXECUTION_MODE; default sequential)",
    ),
    memory_arena: bool | None = typer.Option(
        None,
        "--memory-arena/--no-memory-arena",
        help="onnxruntime's CPU memory arena. (env BNFOLD_MEMORY_ARENA; default on)",
        show_default=False,
    ),
    allow_spinning: bool | None = typer.Option(
        None,
        "--spinning/--no-spinning",
        help="Idle onnxruntime threads busy-wait for work. (env BNFOLD_ALLOW_SPINNING; "
        "default off)",
        show_default=False,
    ),
    max_batch_size: int | None = typer.Option(
        None,
        "--max-batch-size",
        help="Dynamic batching: rows per merged run, 0 = off; a package or "
        "REPO/NAME/config.json overrides it. (env BNFOLD_MAX_BATCH_SIZE; default 32)",
    ),
    max_queue_delay_us: int | None = typer.Option(
        None,
        "--max-queue-delay-us",
        help="Dynamic batching: longest wait (µs) of a request for others; 0 merges what "
        "queued while the runs were busy. (env BNFOLD_MAX_QUEUE_DELAY_US; default 0)",
    ),
    max_queue_size: int | None = typer.Option(
        None,
        "--max-queue-size",
        help="Requests queued per model version before 503 + Retry-After. "
        "(env BNFOLD_MAX_QUEUE_SIZE; default 256)",
    ),
    max_body_bytes: int | None = typer.Option(
        None,
        "--max-body-bytes",
        help="Largest request body, 413 above. (env BNFOLD_MAX_BODY_BYTES; default 64 MiB)",
    ),
    max_decode_bytes: int | None = typer.Option(
        None,
        "--max-decode-bytes",
        help="Estimated memory decoding the requests in flight may take: 413 for one request "
        "above it, 503 + Retry-After while others hold it. (env BNFOLD_MAX_DECODE_BYTES; "
        "default 0: 8 x max body bytes)",
    ),
    max_header_bytes: int | None = typer.Option(
        None,
        "--max-header-bytes",
        help="Largest request line plus header fields, 431 above; at most 1 MiB. "
        "(env BNFOLD_MAX_HEADER_BYTES; default 64 KiB)",
    ),
    max_header_count: int | None = typer.Option(
        None,
        "--max-header-count",
        help="Most header fields in a request, 431 above. (env BNFOLD_MAX_HEADER_COUNT; "
        "default 100)",
    ),
    admin_token: str | None = typer.Option(
        None,
        "--admin-token",
        help="Bearer token enabling load/unload; prefer the env variable, command lines "
        "are visible to other users. (env BNFOLD_ADMIN_TOKEN; default: disabled)",
        show_default=False,
    ),
    log_level: LogLevel | None = typer.Option(
        None, help="debug also logs every request. (env BNFOLD_LOG_LEVEL; default info)"
    ),
    shutdown_grace_seconds: float | None = typer.Option(
        None,
        "--shutdown-grace",
        help="Seconds in-flight requests get on shutdown. (env BNFOLD_SHUTDOWN_GRACE_SECONDS; "
        "default 30)",
    ),
) -> None:
    """Serve a model repository over the KServe V2 inference protocol (REST)."""
    given: dict[str, Any] = {
        "repository": repository,
        "host": host,
        "port": port,
        "device": device,
        "workers": workers,
        "intra_op_threads": intra_op_threads,
        "executor_workers": executor_workers,
        "inter_op_threads": inter_op_threads,
        "execution_mode": execution_mode,
        "memory_arena": memory_arena,
        "allow_spinning": allow_spinning,
        "max_batch_size": max_batch_size,
        "max_queue_delay_us": max_queue_delay_us,
        "max_queue_size": max_queue_size,
        "max_body_bytes": max_body_bytes,
        "max_decode_bytes": max_decode_bytes,
        "max_header_bytes": max_header_bytes,
        "max_header_count": max_header_count,
        "admin_token": admin_token,
        "log_level": log_level,
        "shutdown_grace_seconds": shutdown_grace_seconds,
    }
    try:
        settings = Settings(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            typer.echo(f"error: {field}: {error['msg']}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    try:
        providers = resolve_providers(settings.device)
        ensure_repository(settings.repository)
    except (RepositoryUnavailable, DeviceUnavailable) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logger.info(
        "bnfold serve: repository %s, device %s -> %s",
        settings.repository,
        settings.device.value,
        ", ".join(providers),
    )
    options = uvicorn_options(settings)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    os.environ.update(settings_environment(settings))
    uvicorn.run(
        "bnfold.service.app:create_app_from_env", factory=True, workers=settings.workers, **options
    )


class RepositoryUnavailable(Exception):
    """Nothing to serve: a missing repository, or a default one that cannot be built."""


def settings_environment(settings: Settings) -> dict[str, str]:
    """`settings` as the `BNFOLD_*` variables that rebuild it in a worker process."""
    environment = {}
    for field, value in settings.model_dump(mode="json").items():
        if field == "admin_token":
            if settings.admin_token is not None:
                environment["BNFOLD_ADMIN_TOKEN"] = settings.admin_token.get_secret_value()
            continue
        environment[f"BNFOLD_{field.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return environment


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
    command = [
        sys.executable,
        "-m",
        "bnfold.service.cli",
        "models",
        "build",
        "--repository",
        str(repository),
    ]
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
