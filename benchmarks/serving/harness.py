"""The servers under test: the bench repository, starting a server and waiting until it is
ready, stopping it, and reading its process (memory, CPU time, metrics) from outside."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bnfold.package_format import MANIFEST, parse_manifest

ROOT = Path(__file__).resolve().parent.parent.parent
WORK = ROOT / "benchmarks" / "out" / "serve"
PYTHON = sys.executable
BNFOLD = [PYTHON, "-m", "bnfold"]
START_TIMEOUT_SECONDS = 120.0


def _has_calibration_graph(package: Path) -> bool:
    """Whether REPO/NAME/1 exists with calibration.onnx (schema 2): what drift monitoring needs."""
    manifest = package / MANIFEST
    return manifest.is_file() and parse_manifest(manifest.read_bytes()).has_calibration_graph


def ensure_repository() -> Path:
    """benchmarks/out/serve/repository: the digits MLP and ResNet-18, converted once (again
    when a package predates calibration.onnx: the drift comparison needs it)."""
    repository = WORK / "repository"
    default = ROOT / "models" / "repository"
    if not (default / "digits_mlp" / "1" / MANIFEST).is_file():  # start-up is measured on it
        subprocess.run([*BNFOLD, "models", "build"], check=True, cwd=ROOT)
    if not _has_calibration_graph(repository / "digits_mlp" / "1"):
        shutil.rmtree(repository / "digits_mlp", ignore_errors=True)
        source = default
        if not _has_calibration_graph(default / "digits_mlp" / "1"):
            source = WORK / "digits"  # the embedded repository is left as it is
            shutil.rmtree(source, ignore_errors=True)
            subprocess.run(
                [*BNFOLD, "models", "build", "--repository", str(source)], check=True, cwd=ROOT
            )
        repository.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / "digits_mlp", repository / "digits_mlp")
    if not _has_calibration_graph(repository / "resnet18" / "1"):
        shutil.rmtree(repository / "resnet18", ignore_errors=True)
        subprocess.run(
            [*BNFOLD, "convert", "resnet18", "--repository", str(repository)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    return repository


def input_shape(repository: Path, model: str) -> tuple[int, ...]:
    manifest = parse_manifest((repository / model / "1" / MANIFEST).read_bytes())
    [tensor] = manifest.inputs
    return tuple(1 if dim == -1 else dim for dim in tensor.shape)


def free_port(*taken: int) -> int:
    """A port nothing listens on now, other than `taken` (ports already handed out)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def memory_mb(pid: int, field_name: str) -> float:
    """A field of /proc/PID/status (VmRSS, VmHWM) or smaps_rollup (Pss), in MB (10**6 bytes)."""
    source = "smaps_rollup" if field_name == "Pss" else "status"
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (or of one of its threads), from /proc."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_values(url: str, names: Sequence[str], model: str) -> list[float]:
    """The values of the series `names` (0 when absent) of the server at `url`, for one model."""
    values = dict.fromkeys(names, 0.0)
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{", 1)[0]
            if name in values and f'model="{model}"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    return [values[name] for name in names]


def metric_sum_count(url: str, name: str, model: str) -> tuple[float, float]:
    """The sum and count of a Prometheus histogram of the server at `url`, for one model."""
    total, count = metric_values(url, [f"{name}_sum", f"{name}_count"], model)
    return total, count


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    ready_seconds: float


@contextmanager
def serve(name: str, command: Sequence[str], port: int) -> Iterator[Server]:
    """Start `command` (listening on `port`), wait until ready, stop it with SIGTERM."""
    log = (WORK / f"{name}.log").open("w")
    started = time.perf_counter()
    process = subprocess.Popen(
        list(command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while not _ready(url):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log.name}")
            if time.perf_counter() - started > START_TIMEOUT_SECONDS:
                raise TimeoutError(f"{name} did not become ready; see {log.name}")
            time.sleep(0.01)
        yield Server(name, url, process, time.perf_counter() - started)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def bnfold_command(
    repository: Path | None, port: int, *options: str, grpc_port: int = 0
) -> list[str]:
    """`bnfold serve` on `port`, its gRPC server (on by default, as in production) on
    `grpc_port`: 0 picks a free one, never Triton's 8001 that another server may hold."""
    command = [*BNFOLD, "serve", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    command += ["--grpc-port", str(grpc_port)]
    if repository is not None:
        command += ["--repository", str(repository)]
    return [*command, *options]


def baseline_command(repository: Path, port: int) -> list[str]:
    script = ROOT / "benchmarks" / "baseline_server.py"
    return [PYTHON, str(script), "--repository", str(repository), "--port", str(port)]


def empty_command(port: int) -> list[str]:
    return [PYTHON, str(ROOT / "benchmarks" / "empty_server.py"), "--port", str(port)]
