"""The runtime image, stood in for by a fresh virtual environment: no Docker engine runs here.

The stand-in gets what the Dockerfile's runtime stage gets, made the same way:
the bnfold wheel built from the build context (.dockerignore applied), the
requirement list deploy/runtime-requirements.py prints for `--device cpu`,
installed by pip into an empty venv (so no torch), the default repository from
the build stage's `bnfold models build`, and the runtime stage's ENTRYPOINT +
CMD with its BNFOLD_* ENV. Only the address differs: 127.0.0.1 and a free port
instead of 0.0.0.0:8000. It must answer inference on real digits exactly as
onnxruntime does on the same packages, pass the image's HEALTHCHECK, and stop
gracefully on SIGTERM.

Where the machine allows it (root, or unprivileged user namespaces), the server
runs as PID 1 of its own PID namespace, as in a container, so the SIGTERM test
also shows what `docker stop` reports. What is left to the engine: the base
images, apt, the CUDA variant, the non-root user and the volume;
tests/test_deploy_files.py checks those lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from deploy_files import HEALTHCHECK_SCRIPT, ROOT, dockerfile, in_build_context
from prometheus_client.parser import text_string_to_metric_families

from bnfold.models import BUILTIN_MODELS, builtin_model, digits_dataset

DEFAULT_MODELS = tuple(name for name, spec in BUILTIN_MODELS.items() if spec.in_default_repository)
START_TIMEOUT_SECONDS = 60.0
# The README's claim for every digits model on the held-out split.
MIN_ACCURACY = 0.95
# The served logits against onnxruntime in this process on the same model.onnx:
# bit-identical when the venv resolves the same onnxruntime release (measured: max
# |diff| 0 on all four models). Another release may sum in another order; float32
# rounding of logits of order 10 stays far below 1e-5 relative.
LOGITS_RTOL = LOGITS_ATOL = 1e-5

pytestmark = pytest.mark.timeout(420)


@dataclass
class RuntimeServer:
    process: subprocess.Popen[str]
    venv: Path
    context: Path
    repository: Path
    as_pid_1: bool
    log: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def server_pid(self) -> int:
        """The server's pid here: unshare's child when it runs as PID 1 of its namespace."""
        if not self.as_pid_1:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        (child,) = children.read_text().split()
        return int(child)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return "".join(self.log)


def copy_build_context(destination: Path) -> Path:
    """The files the Dockerfile's COPY lines name, as far as .dockerignore lets them in."""
    sources = {
        source.rstrip("/")
        for stage in dockerfile().stages
        for instruction in stage.all("COPY")
        if "--from=" not in instruction.arguments
        for source in instruction.arguments.split()[:-1]
        if not source.startswith("--")
    }
    for source in sorted(sources):
        path = ROOT / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if in_build_context(relative):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, destination / relative)
    return destination


def clean_environment() -> dict[str, str]:
    """This process's environment minus what would leak the test venv or its settings."""
    leaks = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    return {
        key: value
        for key, value in os.environ.items()
        if key not in leaks and not key.startswith("BNFOLD_")
    }


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def install_runtime(context: Path, target: Path, environment: dict[str, str]) -> Path:
    """The runtime stage's installs, in a fresh venv; returns the venv."""
    dist = target / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(context)])
    environment_dir = target / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(environment_dir)
    python = environment_dir / "bin" / "python"
    requirements = run(
        [
            str(python),
            str(context / "deploy" / "runtime-requirements.py"),
            "--device",
            "cpu",
            str(context / "pyproject.toml"),
        ]
    ).stdout
    requirements_file = target / "runtime-requirements.txt"
    requirements_file.write_text(requirements)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    run([*pip, "-r", str(requirements_file)], env=environment)
    (wheel,) = dist.glob("bnfold-*.whl")
    run([*pip, "--no-deps", str(wheel)], env=environment)
    return environment_dir


def build_repository(repository: Path) -> subprocess.Popen[str]:
    """The build stage's `bnfold models build`, with this (converter) environment."""
    assert "bnfold models build --repository /opt/bnfold/repository" in (
        dockerfile().stage("build").run_text()
    )
    bnfold = Path(sys.executable).parent / "bnfold"
    return subprocess.Popen(
        [str(bnfold), "models", "build", "--repository", str(repository)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def pid_namespace_prefix() -> list[str]:
    """`unshare` so that the command runs as PID 1 of a new PID namespace, as in a
    container; [] where this machine does not allow it.

    PID 1 is special: the kernel drops every signal it has no handler for, so a
    server that does not handle SIGTERM itself would ignore `docker stop` until
    SIGKILL. Running as PID 1 here tests that, and the exit status Docker reports.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    user_namespace = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    prefix = [unshare, *user_namespace, "--pid", "--fork", "--kill-child"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else []


def runtime_command(environment_dir: Path) -> list[str]:
    """ENTRYPOINT + CMD of the runtime stage, the program found on the venv's PATH."""
    runtime = dockerfile().final
    command = runtime.last("ENTRYPOINT").exec_form() + runtime.last("CMD").exec_form()
    program = shutil.which(command[0], path=str(environment_dir / "bin"))
    assert program is not None, f"{command[0]} is not installed in the runtime venv"
    return [program, *command[1:]]


def runtime_environment(environment_dir: Path, repository: Path) -> dict[str, str]:
    """The runtime stage's BNFOLD_* ENV; only where it listens and which repository differ."""
    image_env = dockerfile().final.env()
    settings = {key: value for key, value in image_env.items() if key.startswith("BNFOLD_")}
    settings |= {
        "BNFOLD_HOST": "127.0.0.1",
        "BNFOLD_PORT": "0",
        "BNFOLD_REPOSITORY": str(repository),
    }
    environment = clean_environment() | settings
    environment["PATH"] = f"{environment_dir / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
    environment["VIRTUAL_ENV"] = str(environment_dir)
    return environment


def wait_until_listening(server: RuntimeServer) -> None:
    assert server.process.stderr is not None
    stream = server.process.stderr
    port_found = threading.Event()

    def read() -> None:
        for line in stream:
            server.log.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                server.port = int(found.group(1))
                port_found.set()

    threading.Thread(target=read, name="runtime-log", daemon=True).start()
    if not port_found.wait(START_TIMEOUT_SECONDS):
        pytest.fail("the runtime command did not start listening:\n" + server.text())


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    target = tmp_path_factory.mktemp("runtime")
    repository = target / "models"
    builder = build_repository(repository)
    try:
        context = copy_build_context(target / "context")
        environment_dir = install_runtime(context, target, clean_environment())
        output, _ = builder.communicate(timeout=300)
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait(timeout=10)
    assert builder.returncode == 0, output
    as_pid_1 = pid_namespace_prefix()
    process = subprocess.Popen(
        [*as_pid_1, *runtime_command(environment_dir)],
        env=runtime_environment(environment_dir, repository),
        cwd=target,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = RuntimeServer(process, environment_dir, context, repository, bool(as_pid_1))
    try:
        wait_until_listening(server)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(target, ignore_errors=True)  # the venv alone is ~270 MB


def test_runtime_environment_has_no_torch(runtime: RuntimeServer) -> None:
    probe = "import importlib.util as u; print([m for m in ('torch', 'sklearn') if u.find_spec(m)])"
    result = run([str(runtime.venv / "bin" / "python"), "-c", probe], env=clean_environment())
    assert result.stdout.strip() == "[]"


def test_runtime_serves_the_default_repository_and_answers_digits(
    runtime: RuntimeServer,
) -> None:
    split = digits_dataset()
    with httpx.Client(base_url=runtime.url, timeout=30) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/health/live").status_code == 200
        for name in DEFAULT_MODELS:
            inputs = builtin_model(name).digits_inputs(split.test_inputs)
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(inputs.shape),
                        "datatype": "FP32",
                        "data": inputs.ravel().tolist(),
                    }
                ]
            }
            response = client.post(f"/v2/models/{name}/infer", json=body)
            assert response.status_code == 200, response.text
            (output,) = response.json()["outputs"]
            served = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
            session = ort.InferenceSession(
                str(runtime.repository / name / "1" / "model.onnx"),
                providers=["CPUExecutionProvider"],
            )
            (reference,) = session.run(None, {"input": inputs})
            accuracy = float((served.argmax(axis=1) == split.test_labels).mean())
            assert accuracy >= MIN_ACCURACY, f"{name}: {accuracy:.3f}"
            np.testing.assert_array_equal(served.argmax(axis=1), reference.argmax(axis=1))
            np.testing.assert_allclose(served, reference, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
        metrics = client.get("/metrics").text
    requests = {
        sample.labels["model"]: (sample.labels["endpoint"], sample.labels["code"], sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "bnfold_requests_total"
    }
    assert requests == {name: ("infer", "200", 1.0) for name in DEFAULT_MODELS}


def test_image_healthcheck_passes_against_the_runtime(runtime: RuntimeServer) -> None:
    command = dockerfile().final.last("HEALTHCHECK").exec_form()
    script = runtime.context / "deploy" / HEALTHCHECK_SCRIPT.name
    environment = clean_environment() | {"BNFOLD_PORT": str(runtime.port)}
    python = runtime.venv / "bin" / command[0]
    result = subprocess.run([str(python), str(script)], env=environment, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_image_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    environment = clean_environment() | {"BNFOLD_PORT": str(free_port)}
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert f"unhealthy: http://127.0.0.1:{free_port}/v2/health/ready" in result.stderr


def test_sigterm_stops_the_runtime_gracefully(runtime: RuntimeServer) -> None:
    """`docker stop`: SIGTERM to PID 1, SIGKILL if it is still running after the timeout.

    bnfold drains for the image's BNFOLD_DRAIN_SECONDS (not ready, still answering),
    then uvicorn stops accepting, finishes in-flight requests and the lifespan shutdown,
    then re-raises the SIGTERM it caught. As PID 1 the kernel drops that re-raised
    signal (no handler any more) and the process exits 0, which is what Docker and
    Kubernetes report. Outside a PID namespace it dies of it instead (-15 here,
    143 in a shell), after the same complete shutdown.
    """
    image_env = dockerfile().final.env()
    drain = float(image_env["BNFOLD_DRAIN_SECONDS"])
    grace = float(image_env["BNFOLD_SHUTDOWN_GRACE_SECONDS"])
    started = time.monotonic()
    os.kill(runtime.server_pid, signal.SIGTERM)
    returncode = runtime.process.wait(timeout=drain + grace + 5)
    stopped_after = time.monotonic() - started
    assert drain <= stopped_after < drain + grace  # the drain window, then a quick exit
    expected = (0,) if runtime.as_pid_1 else (0, -signal.SIGTERM)
    assert returncode in expected, runtime.text()
    time.sleep(0.2)  # the log reader thread drains the last lines
    log = runtime.text()
    assert "Application shutdown complete." in log
    assert "Finished server process" in log


def test_runtime_converts_an_onnx_file_without_torch(
    runtime: RuntimeServer, tmp_path: Path
) -> None:
    """The ONNX path of `bnfold convert` is torch-free: the serving install (no torch) folds,
    verifies and packages an .onnx file, and the package serves the same answers."""
    from test_onnx_pipeline import cnn

    from onnx_helpers import export

    model = cnn()
    source = export(model, tmp_path / "cnn.onnx", (1, 2, 6, 6))
    repository = tmp_path / "repo"
    bnfold = str(runtime.venv / "bin" / "bnfold")
    result = run(
        [bnfold, "convert", str(source), "-r", str(repository), "--json"],
        env=clean_environment(),
    )
    report = json.loads(result.stdout)
    assert report["batchnorm"]["total"] == 2 and len(report["batchnorm"]["folded"]) == 1
    x = np.random.default_rng(0).normal(size=(3, 2, 6, 6)).astype(np.float32)
    session = ort.InferenceSession(str(repository / "cnn" / "1" / "model.onnx"))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=1e-5)


def test_runtime_names_the_converter_extra_for_torch_sources(
    runtime: RuntimeServer, tmp_path: Path
) -> None:
    """A torch source on the serving install: one line naming the extra to install, with
    its `[convert]` intact (rich once swallowed it as markup)."""
    bnfold = str(runtime.venv / "bin" / "bnfold")
    result = subprocess.run(
        [bnfold, "convert", "digits_mlp", "-r", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        check=False,
        env=clean_environment(),
    )
    assert result.returncode == 2, result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [
        "error: torch is not installed: install the converter with pip install 'bnfold[convert]'"
    ]
    assert not (tmp_path / "repo").exists()
