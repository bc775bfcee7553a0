"""The load: request bodies, and the two generators that send them.

wrk (one thread, keep-alive connections, a Lua script for the POST bodies) when it is
installed; otherwise a bounded asyncio client in this process, slower: its numbers are
the client's as much as the server's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .harness import WORK, cpu_seconds, input_shape
from .results import Load

WRK_TIMEOUT = "30s"


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


def _driver() -> Callable[[str, Body, int, float], Load]:
    return wrk_load if shutil.which("wrk") else python_load


def driver_description() -> str:
    """Which generator this machine's runs use, for the report."""
    return "wrk 1 thread" if _driver() is wrk_load else "the asyncio fallback client"


def load(url: str, body: Body, concurrency: int, seconds: float, pid: int | None = None) -> Load:
    """A warm-up second, then `seconds` of load; each followed by one more request, which
    returns once the requests the load generator left in flight are done, so a point
    never starts behind the previous one's backlog. With the server's `pid`, also its
    CPU time per request (all threads, and the event-loop thread alone)."""
    drive = _driver()
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
