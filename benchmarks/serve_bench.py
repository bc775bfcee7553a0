"""Serving benchmark: bnfold side by side with the servers a user would compare it to.

In one run, on 127.0.0.1 only, for the digits MLP (tiny) and the ImageNet-shaped
ResNet-18 (heavy), at 1, 8 and 32 concurrent clients, each sending one sample
per request:

  1. bnfold (`bnfold serve`, its defaults), V2 JSON and binary tensors;
  2. the hand-written FastAPI + onnxruntime JSON server (benchmarks/baseline_server.py);
  3. onnxruntime called in-process, at its best batch size and threading (the limit);
  4. an empty FastAPI POST handler (benchmarks/empty_server.py, the HTTP ceiling).

Load comes from wrk (one thread, keep-alive connections, a Lua script for the
POST bodies); without wrk, from a bounded asyncio client in this process
(slower: its numbers are the client's as much as the server's). Every point
runs `--duration` seconds after a one-second warm-up. Also measured: bnfold's
start-to-ready time and memory on the default repository, the memory of
`--workers 2`, and the session options and batching delay the defaults were
chosen by (`--tune`: alternatives on the same points).

Writes its section of BENCHMARKS.md and benchmarks/serve_bench.png.

    python benchmarks/serve_bench.py [--duration 5] [--concurrency 1 8 32] [--no-tune] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "out" / "serve"
PLOT = ROOT / "benchmarks" / "serve_bench.png"
MARK_START = "<!-- serve-bench:start -->"
MARK_END = "<!-- serve-bench:end -->"
PYTHON = sys.executable
BNFOLD = [PYTHON, "-m", "bnfold.service.cli"]
MODELS = ("digits_mlp", "resnet18")
START_TIMEOUT_SECONDS = 120.0
WRK_TIMEOUT = "30s"


# ---------------------------------------------------------------- the repository


def ensure_repository() -> Path:
    """benchmarks/out/serve/repository: the digits MLP and ResNet-18, converted once."""
    repository = WORK / "repository"
    default = ROOT / "models" / "repository"
    if not (default / "digits_mlp" / "1" / "manifest.json").is_file():
        subprocess.run([*BNFOLD, "models", "build"], check=True, cwd=ROOT)
    if not (repository / "digits_mlp" / "1" / "manifest.json").is_file():
        repository.mkdir(parents=True, exist_ok=True)
        shutil.copytree(default / "digits_mlp", repository / "digits_mlp", dirs_exist_ok=True)
    if not (repository / "resnet18" / "1" / "manifest.json").is_file():
        subprocess.run(
            [*BNFOLD, "convert", "resnet18", "--repository", str(repository)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    return repository


def input_shape(repository: Path, model: str) -> tuple[int, ...]:
    manifest = json.loads((repository / model / "1" / "manifest.json").read_text())
    [tensor] = manifest["inputs"]
    return tuple(1 if dim == -1 else dim for dim in tensor["shape"])


@dataclass(frozen=True)
class Body:
    """One request: its bytes on disk (for wrk) and its headers."""

    path: Path
    headers: dict[str, str]


def write_bodies(repository: Path, model: str) -> dict[str, Body]:
    """The same single sample as V2 JSON (flat data) and as binary tensors (in and out)."""
    sample = np.random.default_rng(0).random(input_shape(repository, model), dtype=np.float32)
    tensor = {"name": "input", "shape": list(sample.shape), "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**tensor, "data": sample.reshape(-1).tolist()}]}).encode()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": sample.nbytes}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    bodies = {
        "json": (as_json, {"Content-Type": "application/json"}),
        "binary": (
            header + sample.tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
    }
    written = {}
    for encoding, (content, headers) in bodies.items():
        path = WORK / f"{model}.{encoding}.body"
        path.write_bytes(content)
        written[encoding] = Body(path, headers)
    return written


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def bnfold_command(repository: Path | None, port: int, *options: str) -> list[str]:
    command = [*BNFOLD, "serve", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    if repository is not None:
        command += ["--repository", str(repository)]
    return [*command, *options]


def baseline_command(repository: Path, port: int) -> list[str]:
    script = ROOT / "benchmarks" / "baseline_server.py"
    return [PYTHON, str(script), "--repository", str(repository), "--port", str(port)]


def empty_command(port: int) -> list[str]:
    return [PYTHON, str(ROOT / "benchmarks" / "empty_server.py"), "--port", str(port)]


# ---------------------------------------------------------------- load


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_us: float = float("nan")  # server CPU per request, every thread
    loop_cpu_us: float = float("nan")  # of which the event-loop (main) thread

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


LUA = """
wrk.method = "POST"
local file = io.open("{body}", "rb")
wrk.body = file:read("*a")
file:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %.1f %.1f\\n", summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(url: str, body: Body, concurrency: int, seconds: float) -> Load:
    headers = "\n".join(f'wrk.headers["{key}"] = "{value}"' for key, value in body.headers.items())
    script = WORK / f"{body.path.stem}.lua"
    script.write_text(LUA.format(body=body.path, headers=headers))
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    requests, duration_us, errors, p50_us, p99_us = line.split()[1:]
    return Load(
        int(requests), int(duration_us) / 1e6, int(errors), float(p50_us) / 1e3, float(p99_us) / 1e3
    )


def python_load(url: str, body: Body, concurrency: int, seconds: float) -> Load:
    """The fallback: keep-alive asyncio connections in this process, for `seconds`."""
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    content = body.path.read_bytes()
    head = "".join(f"{key}: {value}\r\n" for key, value in body.headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(content)}\r\n\r\n"
    ).encode() + content
    latencies: list[float] = []
    errors = 0

    async def client(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                writer.write(request)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - sent)
                errors += not status.split()[1].startswith(b"2")
        finally:
            writer.close()

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds) for _ in range(concurrency)))
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    ordered = sorted(latencies) or [float("nan")]
    return Load(
        len(latencies),
        elapsed,
        errors,
        ordered[len(ordered) // 2] * 1e3,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
    )


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (or of one of its threads), from /proc."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, body: Body, concurrency: int, seconds: float, pid: int | None = None) -> Load:
    """A warm-up second, then `seconds` of load; each followed by one more request, which
    returns once the requests the load generator left in flight are done, so a point
    never starts behind the previous one's backlog. With the server's `pid`, also its
    CPU time per request (all threads, and the event-loop thread alone)."""
    drive = wrk_load if shutil.which("wrk") else python_load
    drive(url, body, concurrency, 1.0)
    check_answer(url, body)
    if pid is not None:
        before = cpu_seconds(pid), cpu_seconds(pid, pid)
    result = drive(url, body, concurrency, seconds)
    if pid is not None and result.requests:
        result.cpu_us = (cpu_seconds(pid) - before[0]) / result.requests * 1e6
        result.loop_cpu_us = (cpu_seconds(pid, pid) - before[1]) / result.requests * 1e6
    check_answer(url, body)
    return result


def check_answer(url: str, body: Body) -> None:
    """One request, which must succeed: a server answering errors would benchmark its error path."""
    request = urllib.request.Request(url, data=body.path.read_bytes(), headers=body.headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")


# ---------------------------------------------------------------- in-process onnxruntime


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _throughput(
    session: ort.InferenceSession, batch: np.ndarray, runs: int, seconds: float
) -> float:
    """Samples a second with `runs` threads calling `session` concurrently."""
    session.run(None, {"input": batch})
    counts = [0] * runs
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < deadline:
            session.run(None, {"input": batch})
            counts[index] += 1

    threads = [threading.Thread(target=loop, args=(index,)) for index in range(runs)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) * len(batch) / (time.perf_counter() - started)


def _latency_ms(session: ort.InferenceSession, sample: np.ndarray, seconds: float) -> float:
    session.run(None, {"input": sample})
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        started = time.perf_counter()
        session.run(None, {"input": sample})
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


@dataclass
class InProcess:
    best_samples_per_s: float
    best_batch: int
    best_layout: str
    p50_ms: dict[int, float]  # batch-1 latency by intra-op threads
    by_batch: dict[str, dict[int, float]] = field(default_factory=dict)


def in_process(repository: Path, model: str, seconds: float) -> InProcess:
    """The limit: the best samples/s over batch sizes and threading, and batch-1 latency."""
    path = repository / model / "1" / "model.onnx"
    shape = input_shape(repository, model)
    cores = len(os.sched_getaffinity(0))
    batches = (1, 2, 4, 8, 16) if np.prod(shape) > 10_000 else (1, 8, 64, 256, 1024)
    rng = np.random.default_rng(1)
    by_batch: dict[str, dict[int, float]] = {}
    for threads, runs in ((cores, 1), (1, cores)):
        session = _session(path, threads)
        layout = f"{runs} run(s) x {threads} thread(s)"
        by_batch[layout] = {
            batch: _throughput(
                session, rng.random((batch, *shape[1:]), dtype=np.float32), runs, seconds
            )
            for batch in batches
        }
    layout, batch = max(
        ((layout, batch) for layout, rates in by_batch.items() for batch in rates),
        key=lambda key: by_batch[key[0]][key[1]],
    )
    sample = rng.random(shape, dtype=np.float32)
    p50 = {threads: _latency_ms(_session(path, threads), sample, seconds) for threads in (1, cores)}
    return InProcess(by_batch[layout][batch], batch, layout, p50, by_batch)


# ---------------------------------------------------------------- the run


@dataclass
class Point:
    model: str
    server: str
    concurrency: int
    load: Load


def _metric_sum_count(url: str, name: str, model: str) -> tuple[float, float]:
    values = {"sum": 0.0, "count": 0.0}
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            for kind in values:
                if line.startswith(f"{name}_{kind}{{") and f'model="{model}"' in line:
                    values[kind] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def bench_servers(
    repository: Path, concurrency: Sequence[int], seconds: float
) -> tuple[list[Point], dict[str, dict]]:
    """Every server on every model and encoding; also, for bnfold, its peak memory under this
    load and the mean rows of its runs (what the batcher merged)."""
    points: list[Point] = []
    stats: dict[str, dict] = {"peak_rss_mb": {}, "rows_per_run": {}}
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    port = free_port()
    runs = [
        ("bnfold JSON", bnfold_command(repository, port), "json"),
        ("bnfold binary", bnfold_command(repository, port), "binary"),
        ("hand-written FastAPI", baseline_command(repository, port), "json"),
        ("empty handler", empty_command(port), "json"),
        ("empty handler, binary body", empty_command(port), "binary"),
    ]
    for name, command, encoding in runs:
        with serve(name, command, port) as server:
            for model in MODELS:
                url = f"{server.url}/v2/models/{model}/infer"
                check_answer(url, bodies[model][encoding])
                for clients in concurrency:
                    result = load(
                        url, bodies[model][encoding], clients, seconds, server.process.pid
                    )
                    points.append(Point(model, name, clients, result))
                    print(
                        f"{model:11s} {name:22s} c={clients:<3d} {result.rps:9.1f} req/s "
                        f"p50 {result.p50_ms:8.2f} ms p99 {result.p99_ms:8.2f} ms "
                        f"errors {result.errors}",
                        flush=True,
                    )
            if name.startswith("bnfold"):
                stats["peak_rss_mb"][name] = memory_mb(server.process.pid, "VmHWM")
                rows = {}
                for model in MODELS:
                    total, runs_count = _metric_sum_count(
                        server.url, "bnfold_run_batch_size", model
                    )
                    rows[model] = total / runs_count if runs_count else float("nan")
                stats["rows_per_run"][name] = rows
    return points, stats


def bench_repeats(repository: Path, seconds: float, times: int = 3) -> dict[str, list[float]]:
    """The headline point again, bnfold and the empty handler taking turns, `times` each:
    how much one measurement of it varies on this machine within the run."""
    body = write_bodies(repository, "digits_mlp")["json"]
    rates: dict[str, list[float]] = {"bnfold JSON": [], "empty handler": []}
    port = free_port()
    commands = {
        "bnfold JSON": bnfold_command(repository, port),
        "empty handler": empty_command(port),
    }
    for _ in range(times):
        for name, command in commands.items():
            with serve(f"repeat {name}", command, port) as server:
                url = f"{server.url}/v2/models/digits_mlp/infer"
                rates[name].append(load(url, body, 8, seconds).rps)
    print(f"repeats: {rates}", flush=True)
    return rates


def bench_startup(repeats: int = 3) -> dict[str, float]:
    """Start to ready on the default repository (converted, optimised graphs cached), and RSS."""
    ready, rss = [], []
    for _ in range(repeats):
        port = free_port()
        with serve("bnfold default repository", bnfold_command(None, port), port) as server:
            ready.append(server.ready_seconds)
            rss.append(memory_mb(server.process.pid, "VmRSS"))
    return {"ready_s": statistics.median(ready), "rss_mb": statistics.median(rss)}


def bench_workers(repository: Path) -> dict[str, float]:
    """`--workers 2` on the bench repository: memory of each worker process (RSS and PSS)."""
    port = free_port()
    with serve(
        "bnfold --workers 2", bnfold_command(repository, port, "--workers", "2"), port
    ) as server:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while len(children) < 2 and time.monotonic() < deadline:
            listed = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
            children = [  # uvicorn's workers, not multiprocessing's resource tracker
                int(pid)
                for pid in listed.read_text().split()
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            time.sleep(0.1)
        for _ in range(100):  # both workers loaded: the second answers too
            if all(memory_mb(pid, "VmRSS") > 100 for pid in children):
                break
            time.sleep(0.1)
        time.sleep(1.0)
        return {
            "supervisor_rss_mb": memory_mb(server.process.pid, "VmRSS"),
            "worker_rss_mb": statistics.mean(memory_mb(pid, "VmRSS") for pid in children),
            "worker_pss_mb": statistics.mean(memory_mb(pid, "Pss") for pid in children),
        }


# Where a bnfold process spends its samples. A sample on a run thread (the batcher's, or
# the executor's for compare) counts as such; any other goes to the innermost frame a specific part names (bnfold's own code
# sits inside the framework's frames), else to the innermost frame a generic part names.
RUN_THREAD_PART = "run threads: onnxruntime runs, batch assembly"
RUN_THREADS = ("_serve (service/batching.py", "_worker (concurrent/futures/thread.py")
SPECIFIC_PARTS = (
    (
        "hand-off between threads (wake-ups, futures)",
        ("(concurrent/futures/", "(asyncio/futures.py", "(threading.py"),
    ),
    ("bnfold: batcher (queue, dispatch, completion)", ("(service/batching.py",)),
    ("bnfold: decode (body, JSON or binary to numpy)", ("decode_request (", "read_body (")),
    ("bnfold: encode (numpy to JSON or binary)", ("encode_response (", "inference_response (")),
    ("bnfold: validation, model lookup", ("(service/dataplane.py", "(service/registry.py")),
    ("bnfold: metrics", ("(service/metrics.py",)),
)
GENERIC_PARTS = (
    ("bnfold: other request code", ("(service/app.py", "(service/codec.py", "(service/errors.py")),
    ("Starlette/FastAPI: middleware, routing, responses", ("(starlette/", "(fastapi/")),
    ("uvicorn: HTTP protocol", ("(uvicorn/protocols/", "(uvicorn/middleware/")),
)


def _classify(stack: str) -> str:
    frames = stack.split(";")
    if any(marker in frame for frame in frames for marker in RUN_THREADS):
        return RUN_THREAD_PART
    for parts in (SPECIFIC_PARTS, GENERIC_PARTS):
        for frame in reversed(frames):
            for part, markers in parts:
                if any(marker in frame for marker in markers):
                    return part
    return "event loop (uvloop: sockets, timers, callbacks)"


def bench_profile(repository: Path, seconds: float) -> dict[str, dict[str, float]]:
    """py-spy samples of bnfold under load at 8 clients, by part; {} without py-spy."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PYTHON).parent))
    if spy is None:
        return {}
    shares: dict[str, dict[str, float]] = {}
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    port = free_port()
    with serve("bnfold profiled", bnfold_command(repository, port), port) as server:
        for model, encoding in (
            ("digits_mlp", "json"),
            ("resnet18", "json"),
            ("resnet18", "binary"),
        ):
            url = f"{server.url}/v2/models/{model}/infer"
            raw = WORK / f"profile.{model}.{encoding}.txt"
            loader = threading.Thread(
                target=load, args=(url, bodies[model][encoding], 8, seconds + 2)
            )
            loader.start()
            time.sleep(2.0)  # the one-second warm-up, then load
            subprocess.run(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server.process.pid),
                    "--duration",
                    f"{seconds:g}",
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )
            loader.join()
            counts: dict[str, int] = {}
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                part = _classify(stack)
                counts[part] = counts.get(part, 0) + int(count)
            total = sum(counts.values()) or 1
            shares[f"{model} {encoding}"] = {
                part: 100 * count / total
                for part, count in sorted(counts.items(), key=lambda item: -item[1])
            }
            print(f"profile {model} {encoding}: {shares[f'{model} {encoding}']}", flush=True)
    return shares


ONE_BY_TWO = ("--threads", "1", "--executor-workers", "2")
TWO_BY_ONE = ("--threads", "2", "--executor-workers", "1")
TUNING: tuple[tuple[str, str, tuple[str, ...], str, str, tuple[int, ...]], ...] = (
    # (label, server, options, model, encoding, concurrency levels); every row spells out
    # the setting it varies, so the table keeps its meaning whatever the defaults are
    ("2 runs x 1 thread", "bnfold", ONE_BY_TWO, "resnet18", "binary", (1, 8)),
    ("1 run x 2 threads", "bnfold", TWO_BY_ONE, "resnet18", "binary", (1, 8)),
    (
        "2 runs x 2 threads",
        "bnfold",
        ("--threads", "2", "--executor-workers", "2"),
        "resnet18",
        "binary",
        (1, 8),
    ),
    (
        "1 run x 2 threads, spinning",
        "bnfold",
        (*TWO_BY_ONE, "--spinning"),
        "resnet18",
        "binary",
        (1, 8),
    ),
    (
        "1 run x 2 threads, no memory arena",
        "bnfold",
        (*TWO_BY_ONE, "--no-memory-arena"),
        "resnet18",
        "binary",
        (8,),
    ),
    (
        "1 run x 2 threads, parallel execution",
        "bnfold",
        (*TWO_BY_ONE, "--execution-mode", "parallel", "--inter-op-threads", "2"),
        "resnet18",
        "binary",
        (8,),
    ),
    ("2 runs x 1 thread", "bnfold", ONE_BY_TWO, "resnet18", "json", (8,)),
    ("1 run x 2 threads", "bnfold", TWO_BY_ONE, "resnet18", "json", (8,)),
    ("max_queue_delay_us 0", "bnfold", ("--max-queue-delay-us", "0"), "digits_mlp", "json", (1, 8)),
    (
        "max_queue_delay_us 500",
        "bnfold",
        ("--max-queue-delay-us", "500"),
        "digits_mlp",
        "json",
        (1, 8),
    ),
    (
        "max_queue_delay_us 2000",
        "bnfold",
        ("--max-queue-delay-us", "2000"),
        "digits_mlp",
        "json",
        (1, 8),
    ),
    (
        "batching off (max_batch_size 0)",
        "bnfold",
        ("--max-batch-size", "0"),
        "digits_mlp",
        "json",
        (8,),
    ),
    ("2 runs x 1 thread", "bnfold", ONE_BY_TWO, "digits_mlp", "json", (8,)),
    ("1 run x 2 threads", "bnfold", TWO_BY_ONE, "digits_mlp", "json", (8,)),
    ("bnfold --workers 2", "bnfold", ("--workers", "2"), "digits_mlp", "json", (8, 32)),
    ("empty handler --workers 2", "empty", ("--workers", "2"), "digits_mlp", "json", (8, 32)),
)


def bench_tuning(repository: Path, seconds: float) -> list[dict]:
    rows = []
    bodies = {model: write_bodies(repository, model) for model in MODELS}
    for label, kind, options, model, encoding, levels in TUNING:
        port = free_port()
        command = (
            bnfold_command(repository, port, *options)
            if kind == "bnfold"
            else [*empty_command(port), *options]
        )
        with serve(f"tune {label}", command, port) as server:
            url = f"{server.url}/v2/models/{model}/infer"
            check_answer(url, bodies[model][encoding])
            for clients in levels:
                result = load(url, bodies[model][encoding], clients, seconds)
                rows.append(
                    {"label": label, "model": model, "encoding": encoding, "concurrency": clients}
                    | asdict(result)
                )
                print(
                    f"tune {model:11s} {encoding:6s} {label:40s} c={clients:<3d} "
                    f"{result.rps:9.1f} req/s p50 {result.p50_ms:8.2f} ms "
                    f"p99 {result.p99_ms:8.2f} ms",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------- the report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    from importlib.metadata import version

    names = ("onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "orjson", "numpy")
    return ", ".join(f"{name} {version(name)}" for name in names)


def _find(points: list[Point], model: str, server: str, clients: int) -> Load:
    return next(
        point.load
        for point in points
        if (point.model, point.server, point.concurrency) == (model, server, clients)
    )


def targets(
    points: list[Point], limits: dict[str, InProcess], startup: dict[str, float]
) -> list[tuple[str, str, str, str]]:
    """(target, goal, measured, verdict) rows; the verdict says by how much a miss misses."""
    rows = []

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"missed: {miss}"

    mlp = _find(points, "digits_mlp", "bnfold JSON", 8).rps
    empty = _find(points, "digits_mlp", "empty handler", 8).rps
    rows.append(
        (
            "digits MLP, JSON, 8 clients",
            "≥ 3,500 req/s and ≥ 70 % of the empty handler",
            f"{mlp:,.0f} req/s = {100 * mlp / empty:.0f} % of {empty:,.0f}",
            verdict(
                mlp >= 3500 and mlp >= 0.7 * empty,
                f"{max(3500, 0.7 * empty) - mlp:,.0f} req/s short "
                f"({100 * mlp / max(3500, 0.7 * empty):.0f} % of the goal)",
            ),
        )
    )
    limit = limits["resnet18"].best_samples_per_s
    for encoding, share in (("binary", 0.9), ("JSON", 0.5)):
        rate = _find(points, "resnet18", f"bnfold {encoding}", 8).rps
        rows.append(
            (
                f"ResNet-18, {encoding}, 8 clients",
                f"≥ {100 * share:.0f} % of in-process onnxruntime's best samples/s",
                f"{rate:.1f} samples/s = {100 * rate / limit:.0f} % of {limit:.1f}",
                verdict(rate >= share * limit, f"{100 * (share - rate / limit):.0f} points short"),
            )
        )
    for model in MODELS:
        served = _find(points, model, "bnfold binary", 1).p50_ms
        direct = min(limits[model].p50_ms.values())
        empty_binary = _find(points, model, "empty handler, binary body", 1).p50_ms
        rows.append(
            (
                f"{model}, batch 1, 1 client: p50 (binary)",
                "≤ 2 ms above in-process onnxruntime",
                f"{served:.2f} ms vs {direct:.2f} ms (+{served - direct:.2f} ms; "
                f"the empty handler answers this body in {empty_binary:.2f} ms)",
                verdict(served - direct <= 2.0, f"{served - direct - 2.0:.2f} ms over"),
            )
        )
        served_json = _find(points, model, "bnfold JSON", 1).p50_ms
        empty = _find(points, model, "empty handler", 1).p50_ms
        rows.append(
            (
                f"{model}, batch 1, 1 client: p50 (JSON)",
                "≤ 2 ms above in-process onnxruntime",
                f"{served_json:.2f} ms vs {direct:.2f} ms (+{served_json - direct:.2f} ms; "
                f"the empty handler answers this body in {empty:.2f} ms)",
                verdict(served_json - direct <= 2.0, f"{served_json - direct - 2.0:.2f} ms over"),
            )
        )
    rows.append(
        (
            "start to ready, default repository",
            "≤ 2 s",
            f"{startup['ready_s']:.2f} s",
            verdict(startup["ready_s"] <= 2.0, f"{startup['ready_s'] - 2.0:.2f} s over"),
        )
    )
    rows.append(
        (
            "server RSS, default repository, ready",
            "≤ 200 MB",
            f"{startup['rss_mb']:.0f} MB",
            verdict(startup["rss_mb"] <= 200, f"{startup['rss_mb'] - 200:.0f} MB over"),
        )
    )
    return rows


def _share(profile: dict[str, dict[str, float]], key: str, prefix: str) -> float:
    return sum(share for part, share in profile.get(key, {}).items() if part.startswith(prefix))


def miss_notes(
    points: list[Point],
    limits: dict[str, InProcess],
    startup: dict[str, float],
    stats: dict[str, dict],
    profile: dict[str, dict[str, float]],
    tuning: list[dict],
) -> list[str]:
    """A paragraph for every missed target: by how much (the table) and what the profile shows."""
    missed = {row[0] for row in targets(points, limits, startup) if row[3] != "met"}
    notes = []
    if "digits MLP, JSON, 8 clients" in missed:
        mlp = "digits_mlp json"
        framework = sum(
            _share(profile, mlp, prefix)
            for prefix in ("event loop", "uvicorn", "Starlette/FastAPI")
        )
        own = _share(profile, mlp, "bnfold:")
        threads = _share(profile, mlp, "run threads") + _share(profile, mlp, "hand-off")
        parts = ", ".join(
            f"{part.removeprefix('bnfold: ').split(' (')[0]} {share:.0f} %"
            for part, share in profile.get(mlp, {}).items()
            if part.startswith("bnfold:")
        )
        workers = [
            row
            for row in tuning
            if row["label"] == "bnfold --workers 2" and row["concurrency"] == 8
        ]
        two = (
            f" Two processes (`--workers 2`) served "
            f"{workers[0]['requests'] / workers[0]['seconds']:,.0f} req/s at 8 clients in the "
            "settings table, for a second copy of every model in memory."
            if workers
            else ""
        )
        ours = _find(points, "digits_mlp", "bnfold JSON", 8)
        empty = _find(points, "digits_mlp", "empty handler", 8)
        notes.append(
            "**digits MLP, JSON, 8 clients.** One event-loop thread does the HTTP and Python "
            "work of every request and is the bottleneck (onnxruntime's run takes "
            f"microseconds): it spent {ours.loop_cpu_us:.0f} µs of CPU per request "
            f"({ours.cpu_us:.0f} µs with the run thread) against the empty handler's "
            f"{empty.loop_cpu_us:.0f} µs. In the profile the event loop, uvicorn and "
            f"Starlette/FastAPI take {framework:.0f} % of the samples, much as for the empty "
            f"handler; bnfold's own request code {own:.0f} % ({parts}); the run thread "
            f"{threads:.0f} % (its samples include waiting for the GIL, which the event loop "
            "holds). The difference is bnfold's per-request work spread over many small "
            "steps, none of which alone closes the gap." + two
        )
    for encoding, key in (("binary", "resnet18 binary"), ("JSON", "resnet18 json")):
        if f"ResNet-18, {encoding}, 8 clients" not in missed:
            continue
        limit = limits["resnet18"]
        rows = stats["rows_per_run"].get(f"bnfold {encoding}", {}).get("resnet18", float("nan"))
        empty = _find(
            points,
            "resnet18",
            "empty handler, binary body" if encoding == "binary" else "empty handler",
            8,
        )
        served = _find(points, "resnet18", f"bnfold {encoding}", 8).rps
        cores = len(os.sched_getaffinity(0))
        own_layout = limit.by_batch.get(f"1 run(s) x {cores} thread(s)", {})
        own_best = max(own_layout.values(), default=float("nan"))
        notes.append(
            f"**ResNet-18, {encoding}, 8 clients.** The run threads (onnxruntime) take "
            f"{_share(profile, key, 'run threads'):.0f} % of the samples, decoding "
            f"{_share(profile, key, 'bnfold: decode'):.0f} %; the batcher merged {rows:.1f} rows "
            f"per run on average, where in-process onnxruntime peaked at batch "
            f"{limit.best_batch} ({limit.best_layout}). In-process with bnfold's own layout "
            f"(one run on {cores} threads, which halves batch-1 latency) the best was "
            f"{own_best:.1f} samples/s, of which bnfold served {100 * served / own_best:.0f} %. "
            f"Every image also crosses loopback TCP and uvicorn on the same {cores} cores (the "
            f"empty handler answers {empty.rps:,.0f} such bodies a second at 8 clients, with no "
            "model)."
        )
    for model in MODELS:
        for encoding in ("binary", "JSON"):
            if f"{model}, batch 1, 1 client: p50 ({encoding})" not in missed:
                continue
            server = "empty handler, binary body" if encoding == "binary" else "empty handler"
            empty = _find(points, model, server, 1).p50_ms
            decode = _share(profile, f"{model} {encoding.lower()}", "bnfold: decode")
            notes.append(
                f"**{model}, 1 client, {encoding}.** Receiving and answering this body alone "
                f"takes the empty handler {empty:.2f} ms"
                + (
                    f"; parsing the JSON tensor (orjson, then numpy) is {decode:.0f} % of the "
                    "samples at 8 clients, work any JSON server does. The binary tensor "
                    "extension avoids both."
                    if encoding == "JSON"
                    else "; the rest is handing the run to a run thread and back."
                )
            )
    return notes


def draw_plot(points: list[Point], limits: dict[str, InProcess]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = sorted(
        {point.server for point in points}, key=lambda name: (not name.startswith("bnfold"), name)
    )
    figure, axes = plt.subplots(len(MODELS), 2, figsize=(12, 4.2 * len(MODELS)))
    for row, model in enumerate(MODELS):
        throughput, tail = axes[row]
        for server in servers:
            mine = sorted(
                (point for point in points if (point.model, point.server) == (model, server)),
                key=lambda point: point.concurrency,
            )
            clients = [point.concurrency for point in mine]
            throughput.plot(clients, [point.load.rps for point in mine], marker="o", label=server)
            tail.plot(clients, [point.load.p99_ms for point in mine], marker="o", label=server)
        limit = limits[model].best_samples_per_s
        fastest = max(point.load.rps for point in points if point.model == model)
        if limit < 20 * fastest:
            throughput.axhline(
                limit, color="grey", linestyle="--", label="in-process onnxruntime, best batch"
            )
        else:  # a tiny model: the limit would flatten every server onto the axis
            throughput.set_title(f"{model}: throughput (in-process onnxruntime: {limit:,.0f}/s)")
        for axis, title, unit in (
            (throughput, "throughput", "samples/s (one sample per request)"),
            (tail, "p99 latency", "ms"),
        ):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(sorted({point.concurrency for point in points}))
            axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(unit)
            if not axis.get_title():
                axis.set_title(f"{model}: {title}")
            axis.grid(True, which="both", alpha=0.3)
        throughput.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)
    plt.close(figure)


def _repeats_line(repeats: dict[str, list[float]]) -> str:
    ours, empty = repeats["bnfold JSON"], repeats["empty handler"]
    ratios = [mine / theirs for mine, theirs in zip(ours, empty, strict=True)]
    return (
        f"The headline point measured {len(ours)} more times in this run, bnfold and the empty "
        "handler taking turns (req/s, digits MLP JSON, 8 clients): bnfold "
        + ", ".join(f"{rate:,.0f}" for rate in ours)
        + "; the empty handler "
        + ", ".join(f"{rate:,.0f}" for rate in empty)
        + f"; bnfold at {100 * min(ratios):.0f}-{100 * max(ratios):.0f} % of it. A bnfold "
        "request crosses threads twice (event loop to run thread and back), and how long a "
        "crossing takes on this virtual machine varies, so its numbers move more between "
        "measurements than those of the single-threaded empty handler."
    )


def write_report(
    points: list[Point],
    limits: dict[str, InProcess],
    startup: dict[str, float],
    stats: dict[str, dict],
    repeats: dict[str, list[float]],
    workers: dict[str, float],
    tuning: list[dict],
    profile: dict[str, dict[str, float]],
    run: dict[str, str],
) -> None:
    cores = len(os.sched_getaffinity(0))
    lines = [
        MARK_START,
        "## Serving: bnfold against a hand-written server, onnxruntime and an empty handler",
        "",
        f"Machine: {platform.machine()}, {_cpu_model()} ({cores} cores), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; {_versions()}. "
        f"Date: {date.today()}.",
        f"Command: `{run['command']}` ({run['duration']} s a point after a 1 s warm-up; "
        f"load from {run['driver']}, on the same {cores} cores as the server). "
        f"Load average (1 min) at the start {run['load_start']}, at the end {run['load_end']}.",
        "",
        "Every request carries one sample (batch 1), so requests/s = samples/s. bnfold runs "
        "with its defaults; the hand-written server is benchmarks/baseline_server.py "
        "(pydantic models, a sync handler, onnxruntime's default options, dict responses); "
        "the empty handler (benchmarks/empty_server.py) reads the body and returns a "
        "constant: the most one uvicorn + FastAPI process answers with that body.",
        "",
    ]
    for model in MODELS:
        limit = limits[model]
        lines += [
            f"### {model}",
            "",
            "| server | clients | req/s = samples/s | p50 ms | p99 ms | errors "
            "| server CPU µs/req: all threads (event loop) |",
            "|---|---|---|---|---|---|---|",
        ]
        for point in points:
            if point.model != model:
                continue
            result = point.load
            lines.append(
                f"| {point.server} | {point.concurrency} | {result.rps:,.1f} | "
                f"{result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.errors} | "
                f"{result.cpu_us:,.0f} ({result.loop_cpu_us:,.0f}) |"
            )
        layouts = "; ".join(
            f"{layout}: " + ", ".join(f"b{batch} {rate:,.0f}" for batch, rate in rates.items())
            for layout, rates in limit.by_batch.items()
        )
        latency = ", ".join(
            f"{threads} thread(s) {ms:.2f} ms" for threads, ms in limit.p50_ms.items()
        )
        lines += [
            "",
            f"In-process onnxruntime (the limit): best {limit.best_samples_per_s:,.1f} samples/s "
            f"at batch {limit.best_batch}, {limit.best_layout}. Samples/s by batch: {layouts}. "
            f"Batch-1 p50 latency: {latency}.",
            "",
        ]
    lines += [
        "### Targets",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(points, limits, startup)),
        "",
        _repeats_line(repeats),
        "",
        *(f"{note}\n" for note in miss_notes(points, limits, startup, stats, profile, tuning)),
        f"Memory: `bnfold serve --workers 2` on the bench repository (digits MLP + ResNet-18): "
        f"each worker {workers['worker_rss_mb']:.0f} MB RSS, {workers['worker_pss_mb']:.0f} MB "
        f"PSS (shared pages split), the supervisor {workers['supervisor_rss_mb']:.0f} MB: each "
        "extra worker costs about one worker's PSS, since every worker loads every model. "
        "Peak RSS of the one bnfold process under this benchmark (ResNet-18 batches of up "
        "to 32 images; onnxruntime's arena keeps the largest activations it has needed): "
        + ", ".join(f"{name} {mb:.0f} MB" for name, mb in stats["peak_rss_mb"].items())
        + ". Mean rows per onnxruntime run (what the batcher merged over the whole run): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{model} {rows:.1f}" for model, rows in by_model.items())
            for name, by_model in stats["rows_per_run"].items()
        )
        + ".",
        "",
    ]
    if tuning:
        lines += [
            "### How the defaults were chosen",
            "",
            "The same points with one setting changed (same run, same machine). The defaults: "
            "one run on every CPU (`--threads 0 --executor-workers 0`), sequential execution, "
            "the memory arena on, no spinning, no queue delay. One run of two threads halves "
            "ResNet-18's batch-1 latency against two runs of one thread for about the same "
            "throughput under load (the batcher fills the one run). Spinning gains up to a "
            "tenth on an otherwise idle machine, but its threads busy-wait on the cores the "
            "event loop, other workers and other processes need (on a busy machine it measured "
            "slower, not faster), so it stays opt-in. The memory arena measured within the "
            "noise of no arena, so onnxruntime's default stays. Parallel execution only adds "
            "scheduling to these chain-shaped graphs; a queue delay only adds latency, since "
            "batches already form while a run is busy.",
            "",
            "| model | encoding | setting | clients | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {row['model']} | {row['encoding']} | {row['label']} | {row['concurrency']} | "
                f"{row['requests'] / row['seconds']:,.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
                for row in tuning
            ),
            "",
        ]
    if profile:
        parts = list(dict.fromkeys(part for shares in profile.values() for part in shares))
        lines += [
            "### Where the time goes",
            "",
            "py-spy samples of the bnfold process at 8 clients (every thread, idle waits "
            "excluded), by the innermost frame naming a part, in % of the samples.",
            "",
            "| part | " + " | ".join(profile) + " |",
            "|---|" + "---|" * len(profile),
            *(
                f"| {part} | "
                + " | ".join(f"{shares.get(part, 0.0):.0f}" for shares in profile.values())
                + " |"
                for part in parts
            ),
            "",
        ]
    lines += [
        "![serving benchmark](benchmarks/serve_bench.png)",
        MARK_END,
    ]
    section = "\n".join(lines)
    target = ROOT / "BENCHMARKS.md"
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    if MARK_START in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    target.write_text(text)


def rewrite_report(saved: dict) -> None:
    """The report of a saved run (results.json), without measuring anything again."""
    points = [
        Point(point["model"], point["server"], point["concurrency"], Load(**point["load"]))
        for point in saved["points"]
    ]
    limits = {
        model: InProcess(
            limit["best_samples_per_s"],
            limit["best_batch"],
            limit["best_layout"],
            {int(threads): ms for threads, ms in limit["p50_ms"].items()},
            {
                layout: {int(batch): rate for batch, rate in rates.items()}
                for layout, rates in limit["by_batch"].items()
            },
        )
        for model, limit in saved["limits"].items()
    }
    draw_plot(points, limits)
    write_report(
        points,
        limits,
        saved["startup"],
        saved["stats"],
        saved["repeats"],
        saved["workers"],
        saved["tuning"],
        saved["profile"],
        saved["run"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-tune", action="store_true", help="skip the settings comparison")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--tune-only", action="store_true", help="only the settings comparison, printed"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write BENCHMARKS.md and the plot again from the last run's results.json",
    )
    arguments = parser.parse_args()
    if arguments.report_only:
        rewrite_report(json.loads((WORK / "results.json").read_text()))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    run = {
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
        "duration": f"{arguments.duration:g}",
        "driver": "wrk 1 thread" if shutil.which("wrk") else "the asyncio fallback client",
        "load_start": f"{os.getloadavg()[0]:.2f}",
    }
    repository = ensure_repository()
    if arguments.tune_only:
        bench_tuning(repository, arguments.duration)
        return
    limits = {model: in_process(repository, model, 2.0) for model in MODELS}
    for model, limit in limits.items():
        print(
            f"{model}: in-process best {limit.best_samples_per_s:,.1f} samples/s "
            f"(batch {limit.best_batch}, {limit.best_layout}), batch-1 p50 {limit.p50_ms}"
        )
    points, stats = bench_servers(repository, arguments.concurrency, arguments.duration)
    repeats = bench_repeats(repository, arguments.duration)
    startup = bench_startup()
    print(f"start to ready {startup['ready_s']:.2f} s, RSS {startup['rss_mb']:.0f} MB")
    workers = bench_workers(repository)
    print(f"--workers 2: {workers}")
    tuning = [] if arguments.no_tune else bench_tuning(repository, arguments.duration)
    profile = bench_profile(repository, arguments.duration)
    run["load_end"] = f"{os.getloadavg()[0]:.2f}"
    (WORK / "results.json").write_text(
        json.dumps(
            {
                "points": [asdict(point) for point in points],
                "limits": {model: asdict(limit) for model, limit in limits.items()},
                "startup": startup,
                "stats": stats,
                "repeats": repeats,
                "workers": workers,
                "tuning": tuning,
                "profile": profile,
                "run": run,
            },
            indent=1,
        )
    )
    for row in targets(points, limits, startup):
        print(" | ".join(row))
    if not arguments.no_write:
        draw_plot(points, limits)
        write_report(points, limits, startup, stats, repeats, workers, tuning, profile, run)


if __name__ == "__main__":
    main()
