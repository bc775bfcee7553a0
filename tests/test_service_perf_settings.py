"""Performance settings reach what they configure: onnxruntime's session options, uvicorn's
event loop, HTTP parser and worker processes, the batching defaults."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bnfold.cli import app
from bnfold.service import serve_cli
from bnfold.service import settings as settings_module
from bnfold.service.batch_policy import BatchPolicy
from bnfold.service.http_protocol import GuardedProtocol
from bnfold.service.repository import PackageLocation, read_package
from bnfold.service.rest.app import create_app_from_env
from bnfold.service.runs import run_executor
from bnfold.service.sessions import SessionConfig, load_model
from bnfold.service.settings import ExecutionMode, Settings, available_cpus, settings_environment

from service_packages import write_mlp

runner = CliRunner()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No BNFOLD_* variables, before and after: `bnfold serve --workers` exports them."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("BNFOLD_"):
            monkeypatch.delenv(name)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def captured_run(clean_environment: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace uvicorn.run and the workers' supervisor: record what they were asked to
    serve and how."""
    captured: dict[str, Any] = {}

    def fake_run(application: Any, **options: Any) -> None:
        captured["app"] = application
        captured.update(options)

    def fake_run_workers(config: uvicorn.Config) -> None:
        fake_run(config.app, factory=config.factory, workers=config.workers)

    clean_environment.setattr(serve_cli.uvicorn, "run", fake_run)
    clean_environment.setattr(serve_cli, "run_workers", fake_run_workers)
    return captured


def _package(tmp_path: Path) -> PackageLocation:
    path = write_mlp(tmp_path, "mlp", 1, seed=1)
    return PackageLocation("mlp", 1, path)


def test_session_options_reach_onnxruntime(tmp_path: Path) -> None:
    config = SessionConfig(
        providers=("CPUExecutionProvider",),
        intra_op_threads=2,
        execution_mode=ExecutionMode.PARALLEL,
        inter_op_threads=3,
        memory_arena=False,
        spinning=True,
    )
    model = load_model(read_package(_package(tmp_path)), config)
    for session in (model.eval_session, model.train_session):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 3
        assert options.execution_mode.name == "ORT_PARALLEL"
        assert options.enable_cpu_mem_arena is False
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        # spinning within a run only: the threads sleep once the last run has ended
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_default_session_options(tmp_path: Path) -> None:
    model = load_model(
        read_package(_package(tmp_path)),
        SessionConfig.from_settings(Settings(device="cpu"), ("CPUExecutionProvider",)),
    )
    options = model.eval_session.get_session_options()
    assert options.intra_op_num_threads == available_cpus()
    assert options.execution_mode.name == "ORT_SEQUENTIAL"
    assert options.enable_cpu_mem_arena is True
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert model.batching == BatchPolicy()


def test_one_worker_serves_the_app_on_uvloop_and_httptools(
    captured_run: dict[str, Any], tmp_path: Path
) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    result = runner.invoke(app, ["serve", "-r", str(tmp_path), "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert captured_run["loop"] == "uvloop"
    # httptools, through the protocol that guards against clients (service/http_protocol.py)
    protocol = captured_run["http"].func
    assert issubclass(protocol, HttpToolsProtocol) and protocol is GuardedProtocol
    assert "workers" not in captured_run
    settings: Settings = captured_run["app"].state.settings
    assert BatchPolicy.from_settings(settings) == BatchPolicy(max_batch_size=8)


def test_workers_run_the_app_factory_with_the_settings_in_the_environment(
    captured_run: dict[str, Any], tmp_path: Path
) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    result = runner.invoke(
        app,
        [
            "serve",
            "-r",
            str(tmp_path),
            "--workers",
            "2",
            "--threads",
            "2",
            "--no-memory-arena",
            "--execution-mode",
            "parallel",
            "--max-queue-delay-us",
            "250",
            "--admin-token",
            "s3cret",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert captured_run["app"] == "bnfold.service.rest.app:create_app_from_env"
    assert captured_run["factory"] is True and captured_run["workers"] == 2
    # what each worker process does: build its app from the exported environment
    worker_app = create_app_from_env()
    settings: Settings = worker_app.state.settings
    assert settings.repository == tmp_path and settings.workers == 2
    assert settings.intra_op_threads == 2 and settings.memory_arena is False
    assert settings.execution_mode is ExecutionMode.PARALLEL
    assert settings.max_queue_delay_us == 250
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "s3cret"


def test_workers_get_the_current_names_of_former_settings(
    captured_run: dict[str, Any], tmp_path: Path
) -> None:
    """`BNFOLD_EXECUTOR_WORKERS` is resolved once: each worker reads the current name."""
    write_mlp(tmp_path, "mlp", 1, seed=1)
    os.environ["BNFOLD_EXECUTOR_WORKERS"] = "3"
    result = runner.invoke(app, ["serve", "-r", str(tmp_path), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert os.environ["BNFOLD_CONCURRENT_RUNS"] == "3"
    assert "BNFOLD_EXECUTOR_WORKERS" not in os.environ


def test_settings_survive_the_environment(clean_environment: pytest.MonkeyPatch) -> None:
    settings = Settings(
        port=9100,
        device="cpu",
        concurrent_runs=3,
        allow_spinning=True,
        max_batch_size=0,
        max_queue_size=4,
        admin_token="s3cret",
        log_level="debug",
    )
    environment = settings_environment(settings)
    assert environment["BNFOLD_ADMIN_TOKEN"] == "s3cret"
    for name, value in environment.items():
        clean_environment.setenv(name, value)
    assert Settings() == settings
    assert "BNFOLD_ADMIN_TOKEN" not in settings_environment(Settings(admin_token=""))


@pytest.mark.parametrize(
    ("threads", "runs", "expected"),
    [(0, 0, (4, 1)), (0, 2, (2, 2)), (1, 0, (1, 4)), (3, 0, (3, 1)), (2, 3, (2, 3))],
)
def test_threads_and_runs_fill_the_cpus(
    monkeypatch: pytest.MonkeyPatch, threads: int, runs: int, expected: tuple[int, int]
) -> None:
    """(intra-op threads, concurrent runs) from the settings on a 4-CPU machine; 0 means
    what fills the CPUs given the other, both 0 one run on every CPU."""
    monkeypatch.setattr(settings_module, "available_cpus", lambda: 4)
    chosen = Settings(intra_op_threads=threads, concurrent_runs=runs)
    assert (chosen.session_threads, chosen.resolved_concurrent_runs) == expected


def test_concurrent_runs_size_the_compare_executor() -> None:
    """Two runs at once on `run_executor(2)` (both reach the barrier), on threads named
    like the batcher's run threads."""
    arrived = threading.Barrier(2)

    def run() -> str:
        arrived.wait(timeout=10)
        return threading.current_thread().name

    with run_executor(2) as executor:
        names = [future.result() for future in [executor.submit(run) for _ in range(2)]]
    assert all(name.startswith("bnfold-run-compare") for name in names), names


def test_a_cgroup_cpu_quota_caps_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container the affinity lists the node's cores; the CPU limit is the quota."""
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(settings_module, "_cgroup_cpu_limit", lambda: 1.5)
    assert available_cpus() == 2
    monkeypatch.setattr(settings_module, "_cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 16
