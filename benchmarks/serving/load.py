"""The load: request bodies, and the generators that send them.

Two C load generators from Debian when both are installed, else two bounded asyncio
clients in this process; never one of each, so every transport is driven the same way:

* REST: wrk (one thread, keep-alive connections, a Lua script for the POST bodies);
  gRPC: h2load (nghttp2-client; one thread, one HTTP/2 connection a client, one call
  in flight on each) posting the gRPC-framed ModelInferRequest with gRPC's headers,
  each request's latency read from its log file. No gRPC load generator (ghz) is in
  the package registries this project installs from; h2load speaks the HTTP/2 that
  gRPC is, and the answers are checked with a real gRPC call before and after.
* The fallback: `concurrency` asyncio clients, each on its own connection (for gRPC a
  grpcio channel with its own subchannel pool: one HTTP/2 connection), each sending the
  same pre-built request and reading the answer before the next. Slower: its numbers
  are the client's as much as the server's.

The gRPC message is built with tritonclient's generated protocol code, with the same
sample as the binary REST body (raw tensor bytes): none of the load is the server's code.
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
from typing import Any

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2

from .harness import WORK, cpu_seconds, input_shape
from .results import Load

WRK_TIMEOUT = "30s"


GRPC_SCHEME = "grpc://"
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}
MODEL_INFER = (
    f"/{service_pb2.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelInfer"
)


@dataclass(frozen=True)
class Body:
    """One request: its bytes on disk (for wrk; for gRPC the serialised message) and its
    headers."""

    path: Path
    headers: dict[str, str]


def write_bodies(repository: Path, model: str) -> dict[str, Body]:
    """The same single sample as V2 JSON (flat data), as binary tensors (in and out), and as
    a gRPC ModelInferRequest (raw_input_contents)."""
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
    message = service_pb2.ModelInferRequest(model_name=model)
    message.inputs.add(name="input", datatype="FP32", shape=sample.shape)
    message.raw_input_contents.append(sample.tobytes())
    serialized = message.SerializeToString()
    bodies["grpc"] = (serialized, GRPC_HEADERS)
    written = {}
    for encoding, (content, headers) in bodies.items():
        path = WORK / f"{model}.{encoding}.body"
        path.write_bytes(content)
        written[encoding] = Body(path, headers)
    # beside it, in gRPC's length-prefixed framing, as h2load sends it (the asyncio client
    # sends the message itself and grpcio frames it)
    _framed(written["grpc"]).write_bytes(b"\0" + len(serialized).to_bytes(4, "big") + serialized)
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

    elapsed = asyncio.run(_drive(client, concurrency, seconds))
    return _summary(latencies, elapsed, errors)


def _framed(body: Body) -> Path:
    return body.path.with_name(body.path.name.replace(".grpc.", ".grpc.framed."))


def h2load_load(url: str, body: Body, concurrency: int, seconds: float) -> Load:
    """gRPC ModelInfer from h2load, for `seconds`; `url` is grpc://host:port."""
    log = WORK / f"{body.path.stem}.h2load.log"
    log.unlink(missing_ok=True)
    command = [
        "h2load",
        "-t1",
        f"-c{concurrency}",
        "-m1",
        f"-D{seconds:g}",
        f"-d{_framed(body)}",
        f"--log-file={log}",
        *(f"-H{name}: {value}" for name, value in body.headers.items()),
        f"http://{url.removeprefix(GRPC_SCHEME)}{MODEL_INFER}",
    ]
    subprocess.run(command, capture_output=True, text=True, check=True)
    statuses, latencies_us, starts_us = [], [], []
    for line in log.read_text().splitlines():
        start, status, latency = line.split("\t")[:3]
        starts_us.append(int(start))
        statuses.append(int(status))
        latencies_us.append(int(latency))
    ordered = sorted(latencies_us) or [float("nan")]
    elapsed = (max(starts_us) - min(starts_us)) / 1e6 if starts_us else seconds
    return Load(
        len(statuses),
        max(elapsed, seconds),
        sum(not 200 <= status < 300 for status in statuses),
        ordered[len(ordered) // 2] / 1e3,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3,
    )


def grpc_load(url: str, body: Body, concurrency: int, seconds: float) -> Load:
    """gRPC ModelInfer from `concurrency` clients in this process, for `seconds`; `url` is
    grpc://host:port."""
    address = url.removeprefix(GRPC_SCHEME)
    content = body.path.read_bytes()
    latencies: list[float] = []
    errors = 0

    async def client(deadline: float) -> None:
        nonlocal errors
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            infer = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out: no (de)serialising
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    await infer(content)
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - sent)

    elapsed = asyncio.run(_drive(client, concurrency, seconds))
    return _summary(latencies, elapsed, errors)


def _c_generators() -> bool:
    return bool(shutil.which("wrk") and shutil.which("h2load"))


def _driver(url: str = "") -> Callable[[str, Body, int, float], Load]:
    if url.startswith(GRPC_SCHEME):
        return h2load_load if _c_generators() else grpc_load
    return wrk_load if _c_generators() else python_load


def driver_description() -> str:
    """Which generator this machine's runs use, for the report."""
    if _c_generators():
        return "wrk 1 thread (REST), h2load 1 thread (gRPC)"
    return "the asyncio fallback clients (REST: sockets, gRPC: grpcio)"


def load(url: str, body: Body, concurrency: int, seconds: float, pid: int | None = None) -> Load:
    """A warm-up second, then `seconds` of load; each followed by one more request, which
    returns once the requests the load generator left in flight are done, so a point
    never starts behind the previous one's backlog. With the server's `pid`, also its
    CPU time per request (all threads, and the event-loop thread alone)."""
    drive = _driver(url)
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
    if url.startswith(GRPC_SCHEME):
        with grpc.insecure_channel(url.removeprefix(GRPC_SCHEME)) as channel:
            infer = channel.unary_unary(
                MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
            )
            answer = infer(body.path.read_bytes(), timeout=60)  # raises on any error status
        if not answer.raw_output_contents:
            raise RuntimeError(f"{url} answered without outputs")
        return
    request = urllib.request.Request(url, data=body.path.read_bytes(), headers=body.headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")


async def _drive(client: Any, concurrency: int, seconds: float) -> float:
    """Run `concurrency` copies of `client(deadline)` until the deadline; the seconds taken."""
    started = time.perf_counter()
    await asyncio.gather(*(client(started + seconds) for _ in range(concurrency)))
    return time.perf_counter() - started


def _summary(latencies: list[float], elapsed: float, errors: int) -> Load:
    ordered = sorted(latencies) or [float("nan")]
    return Load(
        len(latencies),
        elapsed,
        errors,
        ordered[len(ordered) // 2] * 1e3,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
    )
