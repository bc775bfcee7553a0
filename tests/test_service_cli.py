"""`bnfold serve`: options and environment into Settings, start-up errors, the real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort
import pytest
import typer
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.service import serve_cli
from bnfold.service.settings import Device, Settings, environment_variable

from service_packages import write_mlp

runner = CliRunner()
SETTING_OPTIONS = (
    "--repository",
    "--host",
    "--port",
    "--device",
    "--threads",
    "--intra-op-threads",
    "--workers",
    "--concurrent-runs",
    "--executor-workers",  # the former name of --concurrent-runs
    "--inter-op-threads",
    "--execution-mode",
    "--memory-arena",
    "--no-memory-arena",
    "--spinning",
    "--no-spinning",
    "--max-batch-size",
    "--max-queue-delay-us",
    "--max-queue-size",
    "--max-body-bytes",
    "--max-decode-bytes",
    "--max-header-bytes",
    "--max-header-count",
    "--header-timeout-seconds",
    "--body-timeout-seconds",
    "--keep-alive-seconds",
    "--max-connections",
    "--admin-token",
    "--log-level",
    "--log-format",
    "--access-log",
    "--no-access-log",
    "--shutdown-grace",
    "--drain-seconds",
    "--drift-monitoring",
    "--no-drift-monitoring",
    "--drift-sample-fraction",
    "--drift-window-seconds",
    "--drift-kl-threshold",
    "--drift-metrics-layers",
    "--drift-reservoir-samples",
    "--drift-reservoir-bytes",
)


@pytest.fixture
def captured_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace uvicorn.run: record the app and options instead of serving."""
    captured: dict[str, Any] = {}

    def fake_run(application: Any, **options: Any) -> None:
        captured["settings"] = application.state.settings
        captured.update(options)

    monkeypatch.setattr(serve_cli.uvicorn, "run", fake_run)
    for name in list(os.environ):
        if name.startswith("BNFOLD_"):
            monkeypatch.delenv(name)
    return captured


def test_help_lists_every_setting_with_examples() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in SETTING_OPTIONS:
        assert option in result.output
    assert "Examples" in result.output and "BNFOLD_ADMIN_TOKEN" in result.output
    assert set(Settings.model_fields) == {
        "repository",
        "host",
        "port",
        "device",
        "workers",
        "intra_op_threads",
        "concurrent_runs",
        "inter_op_threads",
        "execution_mode",
        "memory_arena",
        "allow_spinning",
        "max_batch_size",
        "max_queue_delay_us",
        "max_queue_size",
        "max_body_bytes",
        "max_decode_bytes",
        "max_header_bytes",
        "max_header_count",
        "admin_token",
        "console",
        "grpc",
        "grpc_port",
        "warmup",
        "resident_train_graph",
        "otlp_endpoint",
        "log_level",
        "log_format",
        "access_log",
        "shutdown_grace_seconds",
        "drain_seconds",
        "header_timeout_seconds",
        "body_timeout_seconds",
        "keep_alive_seconds",
        "max_connections",
        "drift_monitoring",
        "drift_sample_fraction",
        "drift_cpu_budget",
        "drift_window_seconds",
        "drift_kl_threshold",
        "drift_metrics_layers",
        "drift_reservoir_samples",
        "drift_reservoir_bytes",
        "version_policy",
        "recalibration_threads",
    }


def serve_options() -> dict[str, Any]:
    """The click parameters `bnfold serve` was generated with, by name."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return {parameter.name: parameter for parameter in group.commands["serve"].params}


def test_every_setting_is_an_option_whose_help_says_its_variable_and_default() -> None:
    """The options are generated from the fields: each field's description, environment
    variable and default, computed from the field, so none can drift from `Settings`."""
    options = serve_options()
    for field, info in Settings.model_fields.items():
        help_text = options[field].help
        assert help_text is not None and help_text.startswith(info.description or "-"), field
        assert f"(env {environment_variable(field)}; default " in help_text, field
    assert options["max_body_bytes"].help.endswith("(env BNFOLD_MAX_BODY_BYTES; default 64 MiB)")
    assert options["max_header_bytes"].help.endswith("default 64 KiB)")
    assert options["memory_arena"].help.endswith("default on)")
    assert options["allow_spinning"].help.endswith("(env BNFOLD_ALLOW_SPINNING; default off)")
    assert options["shutdown_grace_seconds"].help.endswith("default 30)")
    assert options["execution_mode"].help.endswith("default sequential)")
    assert options["admin_token"].help.endswith("(env BNFOLD_ADMIN_TOKEN; default unset)")
    assert options["repository"].opts == ["--repository", "-r"]
    assert options["intra_op_threads"].opts == ["--threads", "--intra-op-threads"]
    assert options["allow_spinning"].secondary_opts == ["--no-spinning"]
    assert options["executor_workers"].help.startswith("Deprecated")
    assert "--concurrent-runs" in options["executor_workers"].help


def test_help_never_shows_the_admin_token() -> None:
    result = runner.invoke(
        app, ["serve", "--help"], env={"COLUMNS": "200", "BNFOLD_ADMIN_TOKEN": "s3cret-token"}
    )
    assert result.exit_code == 0 and "s3cret-token" not in result.output


@pytest.mark.parametrize(
    ("arguments", "runs", "warning"),
    [
        (["--executor-workers", "3"], 3, "--executor-workers is deprecated, use --concurrent-runs"),
        (
            ["--executor-workers", "3", "--concurrent-runs", "2"],
            2,
            "--executor-workers is deprecated, ignored: --concurrent-runs is given",
        ),
        (["--concurrent-runs", "2"], 2, None),
    ],
)
def test_the_former_concurrent_runs_option_still_works_with_a_warning(
    captured_run: dict[str, Any],
    tmp_path: Path,
    arguments: list[str],
    runs: int,
    warning: str | None,
) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    result = runner.invoke(app, ["serve", "-r", str(tmp_path), *arguments])
    assert result.exit_code == 0, result.output
    assert captured_run["settings"].concurrent_runs == runs
    if warning is None:
        assert "deprecated" not in result.stderr
    else:
        assert result.stderr.splitlines()[0] == f"warning: {warning}"


@pytest.mark.parametrize(
    ("environment", "arguments", "runs", "outcome"),
    [
        ({}, [], 3, "use BNFOLD_CONCURRENT_RUNS"),
        ({"BNFOLD_CONCURRENT_RUNS": "2"}, [], 2, "ignored: BNFOLD_CONCURRENT_RUNS is set"),
        ({}, ["--concurrent-runs", "5"], 5, "ignored: concurrent_runs is given"),
    ],
)
def test_the_former_concurrent_runs_variable_still_works_with_a_warning(
    captured_run: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    environment: dict[str, str],
    arguments: list[str],
    runs: int,
    outcome: str,
) -> None:
    """`BNFOLD_EXECUTOR_WORKERS` ranks below `BNFOLD_CONCURRENT_RUNS` and the option."""
    write_mlp(tmp_path, "mlp", 1, seed=1)
    for name, value in {"BNFOLD_EXECUTOR_WORKERS": "3", **environment}.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["serve", "-r", str(tmp_path), *arguments])
    assert result.exit_code == 0, result.output
    assert captured_run["settings"].concurrent_runs == runs
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"BNFOLD_EXECUTOR_WORKERS is deprecated, {outcome}"]


def test_the_former_keyword_still_works_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert Settings(executor_workers=2) == Settings(concurrent_runs=2)
    assert "executor_workers is deprecated, use concurrent_runs" in caplog.messages


def test_options_win_over_the_environment(
    captured_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    monkeypatch.setenv("BNFOLD_PORT", "9100")
    monkeypatch.setenv("BNFOLD_ADMIN_TOKEN", "from-env")
    monkeypatch.setenv("BNFOLD_INTRA_OP_THREADS", "4")
    result = runner.invoke(
        app,
        [
            "serve",
            "-r",
            str(tmp_path),
            "--threads",
            "2",
            "--device",
            "cpu",
            "--shutdown-grace",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    settings: Settings = captured_run["settings"]
    assert settings.repository == tmp_path and settings.device is Device.CPU
    assert settings.intra_op_threads == 2 and settings.port == 9100
    assert (
        settings.admin_token is not None and settings.admin_token.get_secret_value() == "from-env"
    )
    assert captured_run["port"] == 9100 and captured_run["host"] == "127.0.0.1"
    assert captured_run["timeout_graceful_shutdown"] == 5
    assert captured_run["access_log"] is False


def test_defaults(
    captured_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    monkeypatch.setenv("BNFOLD_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("BNFOLD_ADMIN_TOKEN", "")
    assert runner.invoke(app, ["serve"]).exit_code == 0
    settings: Settings = captured_run["settings"]
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, Device.AUTO)
    assert settings.max_body_bytes == 64 * 2**20 and settings.admin_token is None
    assert settings.shutdown_grace_seconds == 30 and settings.resolved_concurrent_runs >= 1
    assert (settings.max_header_bytes, settings.max_header_count) == (64 * 2**10, 100)
    assert captured_run["h11_max_incomplete_event_size"] == 64 * 2**10


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "70000"], "port"),
        (["--threads", "-1"], "intra_op_threads"),
        (["--max-body-bytes", "0"], "max_body_bytes"),
        (["--max-header-bytes", "1023"], "max_header_bytes"),
        (["--max-header-bytes", str(2**20 + 1)], "max_header_bytes"),
        (["--max-header-count", "0"], "max_header_count"),
        (["--device", "gpu"], "gpu"),
        (["--repository", "/nonexistent/repository"], "does not exist"),
    ],
)
def test_bad_settings_exit_2(
    captured_run: dict[str, Any], tmp_path: Path, arguments: list[str], message: str
) -> None:
    result = runner.invoke(app, ["serve", "-r", str(tmp_path), *arguments])
    assert result.exit_code == 2
    assert message in result.output
    assert "settings" not in captured_run


@pytest.mark.parametrize("case", ["a file", "below a file", "a symlink loop", "a name too long"])
def test_a_repository_that_is_no_directory_is_one_line_and_exit_2(
    captured_run: dict[str, Any], tmp_path: Path, case: str
) -> None:
    """Whatever the path, `bnfold serve` says what is wrong with it in one line: no traceback."""
    file = tmp_path / "models.txt"
    file.write_text("not a repository\n")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    too_long = tmp_path / ("a" * 300)
    repository, problem = {
        "a file": (file, "is not a directory"),
        "below a file": (file / "repo", f"does not exist: {file} is not a directory"),
        "a symlink loop": (loop, "cannot be opened: Too many levels of symbolic links"),
        "a name too long": (too_long, "cannot be opened: File name too long"),
    }[case]
    result = runner.invoke(app, ["serve", "-r", str(repository), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: model repository {repository} {problem}"]
    assert "settings" not in captured_run


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA"
)
def test_cuda_without_cuda_fails_at_start(captured_run: dict[str, Any], tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "-r", str(tmp_path), "--device", "cuda"])
    assert result.exit_code == 2
    assert "onnxruntime-gpu" in result.output
    assert "settings" not in captured_run


def test_empty_default_repository_is_built_in_a_child_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = tmp_path / "repository"
    monkeypatch.setattr(serve_cli, "DEFAULT_REPOSITORY", default)
    commands: list[list[str]] = []

    def build(command: list[str], check: bool) -> subprocess.CompletedProcess[bytes]:
        commands.append(command)
        write_mlp(default, "mlp", 1, seed=1)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(serve_cli.subprocess, "run", build)
    serve_cli.ensure_repository(default)
    build_command = [sys.executable, "-m", "bnfold", "models", "build", "--repository"]
    assert commands == [[*build_command, str(default)]]
    serve_cli.ensure_repository(default)  # built: no second build
    assert len(commands) == 1


def test_failed_default_build_says_how_to_fix_it(
    captured_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(serve_cli, "DEFAULT_REPOSITORY", tmp_path)
    monkeypatch.setattr(
        serve_cli.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 1)
    )
    result = runner.invoke(app, ["serve", "-r", str(tmp_path)])
    assert result.exit_code == 2
    assert "pip install 'bnfold[convert]'" in result.output
    assert "bnfold models build" in result.output


def test_the_real_command_serves_within_seconds(service_repository: Path) -> None:
    """`python -m bnfold serve` as a user runs it; SIGINT stops it cleanly."""
    started = time.monotonic()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bnfold",
            "serve",
            "-r",
            str(service_repository),
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={key: value for key, value in os.environ.items() if not key.startswith("BNFOLD_")},
    )
    log: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        else:
            pytest.fail("the server exited:\n" + "".join(log))
        assert time.monotonic() - started < 20
        ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
        assert ready.status_code == 200
        text = "".join(log)
        assert re.search(r"loaded mlp version 2 in [\d.]+ s on CPUExecutionProvider", text)
        assert "broken_hash version 1 unavailable: sha256 of model.onnx" in text
        assert "4 of 6 package versions ready, providers CPUExecutionProvider" in text
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0


def test_settings_import_nothing_else_of_the_service_nor_the_models() -> None:
    """settings.py is the leaf the service builds on, and finds the embedded repository
    without running `bnfold.models` (numpy and the model registry)."""
    check = "import sys, bnfold.service.settings; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [name for name in loaded if name.startswith("bnfold.service.")] == [
        "bnfold.service.settings"
    ]
    assert [name for name in loaded if name.startswith("bnfold.models")] == []


def test_the_default_repository_is_the_models_one() -> None:
    from bnfold.models import DEFAULT_REPOSITORY

    assert serve_cli.DEFAULT_REPOSITORY == DEFAULT_REPOSITORY
    assert Settings.model_fields["repository"].default == DEFAULT_REPOSITORY


def test_the_readme_table_lists_every_setting() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    serving = readme.split("\n## Serving\n", 1)[1].split("\n### ", 1)[0]
    for field in Settings.model_fields:
        assert f"`{environment_variable(field)}`" in serving, field
