"""What the reliability tests drive the service with: a real `bnfold serve` process, its
memory, and a bounded asynchronous load generator.

The server runs as its own process (`python -m bnfold.service.cli serve`), as
in production: it has its own cores and GIL, its resident memory can be read
from /proc, and it can be sent SIGTERM. Every wait here has a deadline and every
process is killed on the way out, so a failing test cannot leave a server behind
or hang the suite.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

START_TIMEOUT_SECONDS = 60.0
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    """A `bnfold serve` child process on 127.0.0.1 and the log it has written so far."""

    process: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (resident now) and VmHWM (peak resident) of the server, in KiB."""
        return read_memory_kib(self.pid)

    def log_text(self) -> str:
        return "".join(self.log)


def read_memory_kib(pid: int) -> dict[str, int]:
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0])
    return figures


def serve_command(repository: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bnfold.service.cli",
        "serve",
        "-r",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
        *options,
    ]


@contextmanager
def server_process(
    repository: Path, *options: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start `bnfold serve` on a free port, wait until it listens, kill it on the way out."""
    clean_env = {key: value for key, value in os.environ.items() if not key.startswith("BNFOLD_")}
    process = subprocess.Popen(
        serve_command(repository, *options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**clean_env, **(env or {})},
    )
    log: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = _LISTENING.search(line)
            if match and not found.is_set():
                port.append(int(match.group(1)))
                found.set()
        found.set()

    threading.Thread(target=drain, name="bnfold-serve-log", daemon=True).start()
    try:
        if not found.wait(START_TIMEOUT_SECONDS) or not port:
            raise RuntimeError("bnfold serve did not start:\n" + "".join(log))
        yield ServerProcess(process, port[0], log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def wait_for_exit(process: subprocess.Popen[str], timeout: float) -> float:
    """Seconds until `process` exited; kills it and fails when it takes longer than `timeout`."""
    started = time.monotonic()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        raise AssertionError(f"the server was still running {timeout} s later") from None
    return time.monotonic() - started


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class Outcome:
    """One request's fate: its index in the plan, status (0: no response), body, seconds."""

    index: int
    status: int
    body: bytes
    headers: httpx.Headers
    seconds: float
    error: str = ""


Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def _drive(
    url: str, count: int, concurrency: int, send: Send, timeout: float, deadline: float
) -> list[Outcome]:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(index: int) -> Outcome:
            async with semaphore:
                started = time.perf_counter()
                try:
                    response = await send(client, index)
                except httpx.HTTPError as exc:
                    return Outcome(
                        index,
                        0,
                        b"",
                        httpx.Headers(),
                        time.perf_counter() - started,
                        f"{type(exc).__name__}: {exc}",
                    )
                return Outcome(
                    index,
                    response.status_code,
                    response.content,
                    response.headers,
                    time.perf_counter() - started,
                )

        return await asyncio.wait_for(
            asyncio.gather(*(one(index) for index in range(count))), deadline
        )


def run_load(
    url: str,
    count: int,
    concurrency: int,
    send: Send,
    *,
    timeout: float = 30.0,
    deadline: float = 120.0,
) -> list[Outcome]:
    """Send `count` requests, at most `concurrency` at a time; all done within `deadline` s."""
    return asyncio.run(_drive(url, count, concurrency, send, timeout, deadline))


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ---------------------------------------------------------------- raw HTTP


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(
    port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> RawResponse:
    """One HTTP/1.1 request with the request target sent byte for byte.

    httpx (like any client) normalises `..` and percent-escapes in a URL; an
    attacker's client does not, so path tests write the request line themselves.
    """
    head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        received = bytearray()
        while chunk := connection.recv(65536):
            received += chunk
    header_block, _, payload = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), parsed, payload)
