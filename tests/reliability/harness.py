"""What the reliability tests drive the service with: a real `bnfold serve` process, its
memory, and a bounded asynchronous load generator.

The server runs as its own process (`python -m bnfold serve`), as
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
from contextlib import contextmanager, suppress
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


def reset_peak(server: ServerProcess) -> int:
    """Start the server's VmHWM afresh; returns its resident bytes now."""
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")
    return server.memory_kib()["VmRSS"] * 1024


def settled_rss(server: ServerProcess, ceiling: int, seconds: float) -> int:
    """The server's RSS once it is at most `ceiling`, or after `seconds` (glibc's trim runs
    a second after a burst of large requests ends)."""
    deadline = time.monotonic() + seconds
    rss = server.memory_kib()["VmRSS"] * 1024
    while rss > ceiling and time.monotonic() < deadline:
        time.sleep(0.1)
        rss = server.memory_kib()["VmRSS"] * 1024
    return rss


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
        "bnfold",
        "serve",
        "-r",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
        # gRPC on a free port too, never Triton's 8001 (another server may hold it)
        "--grpc-port",
        "0",
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
        # its own process group: on the way out the whole group goes, uvicorn's
        # --workers processes included (killing the parent alone left them running)
        start_new_session=True,
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
        server = ServerProcess(process, port[0], log)
        # with --workers N, the port is bound before the workers listen on it
        workers = int(options[options.index("--workers") + 1]) if "--workers" in options else 1
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while server.log_text().count("Application startup complete") < workers:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bnfold serve did not start:\n" + server.log_text())
            time.sleep(0.01)
        yield server
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
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
    """One request's fate: its index, status (0: no response), headers, body, seconds."""

    index: int
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float
    error: str = ""


class Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1, requests written byte for byte.

    The load generator's client: httpx's pool costs more CPU per request than the
    server does on these machines, and with hundreds of connections it, not the
    server, would set the pace. Responses from the service always carry a
    Content-Length. A broken connection is reopened on the next request.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(
        self, index: int, path: str, content: bytes, headers: dict[str, str] | None = None
    ) -> Outcome:
        started = time.perf_counter()
        try:
            status, parsed, body = await asyncio.wait_for(
                self._exchange(path, content, headers or {}), self.timeout
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            await self.close()
            return Outcome(index, 0, {}, b"", time.perf_counter() - started, repr(exc))
        return Outcome(index, status, parsed, body, time.perf_counter() - started)

    async def connect(self) -> None:
        """Open the connection unless it is open; OSError (refused) when it cannot be: what
        tells a request that never left the client from one the server dropped."""
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self.port)

    async def _exchange(
        self, path: str, content: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        await self.connect()
        assert self._streams is not None
        reader, writer = self._streams
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(content)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + content)
        await writer.drain()
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        parsed = {}
        for line in lines:
            name, _, value = line.partition(":")
            if name:
                parsed[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(parsed.get("content-length", "0")))
        if parsed.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), parsed, body

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()


Send = Callable[[Connection, int], Awaitable[Outcome]]


async def _workers(
    port: int, workers: int, next_index: Callable[[], int | None], send: Send, timeout: float
) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def worker() -> None:
        connection = Connection(port, timeout)
        try:
            while (index := next_index()) is not None:
                outcomes.append(await send(connection, index))
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(workers)))
    return sorted(outcomes, key=lambda outcome: outcome.index)


def run_load(
    port: int,
    count: int,
    concurrency: int,
    send: Send,
    *,
    timeout: float = 30.0,
    deadline: float = 120.0,
) -> list[Outcome]:
    """Requests 0..count-1 over `concurrency` connections, each sending as soon as it has
    its answer; all done within `deadline` seconds."""
    indices = iter(range(count))

    def next_index() -> int | None:
        return next(indices, None)

    async def main() -> list[Outcome]:
        return await asyncio.wait_for(
            _workers(port, concurrency, next_index, send, timeout), deadline
        )

    return asyncio.run(main())


def run_for(
    port: int, clients: int, seconds: float, send: Send, *, timeout: float = 30.0
) -> list[Outcome]:
    """`clients` connections sending back to back for `seconds` (then up to `timeout` more)."""
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))

    def next_index() -> int | None:
        return next(counter) if time.monotonic() < stop_at else None

    async def main() -> list[Outcome]:
        return await asyncio.wait_for(
            _workers(port, clients, next_index, send, timeout), seconds + timeout + 30
        )

    return asyncio.run(main())


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


# ---------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics (0 when it is not there yet)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            found = dict(_LABEL.findall(match.group(2) or ""))
            if all(found.get(key) == value for key, value in labels.items()):
                return float(match.group(3))
    return 0.0


def wait_for_metric(url: str, name: str, at_least: float, timeout: float, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, name, **labels) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} did not reach {at_least} in {timeout} s")
        time.sleep(0.005)
