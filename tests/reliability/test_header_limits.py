"""Security: the request head (request line and header fields) is capped in bytes and fields.

Before the cap, uvicorn buffered a head of any size and its parser built it by
concatenation: a 64 MiB header was answered after 6 s, 128 MiB after 24 s
(quadratic), and health checks on other connections stalled for seconds
meanwhile. Now the bytes from a request's first byte to the end of its head
are counted, and past `--max-header-bytes` or `--max-header-count` the client
gets `431 Request Header Fields Too Large` with a V2 JSON error naming the limit,
and the connection closes (service/http_protocol.py).

The cases run against a real `bnfold serve` process with small limits given as
options (so the option reaches the protocol, across `--workers 2` too), and the
defaults against the in-process test server (so tests/service_server.py runs
the protocol production runs). Requests are written on raw sockets: a head must
be exactly as long as the case says.
"""

from __future__ import annotations

import pickle
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import orjson
import pytest

from bnfold.service.http_protocol import HeadLimitedProtocol, HeadLimits
from bnfold.service.server_options import uvicorn_options
from bnfold.service.settings import Settings

from .harness import RawResponse, ServerProcess, server_process
from service_server import RunningServer

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_COUNT = 20
SOCKET_TIMEOUT_SECONDS = 10.0


@pytest.fixture(scope="module")
def limited_server(reliability_repository: Path) -> Iterator[ServerProcess]:
    with server_process(
        reliability_repository,
        "--max-header-bytes",
        str(MAX_HEADER_BYTES),
        "--max-header-count",
        str(MAX_HEADER_COUNT),
    ) as server:
        yield server


def head(
    size: int, target: str = "/v2/health/live", method: str = "GET", fields: Sequence[str] = ()
) -> bytes:
    """A request head of exactly `size` bytes (to the blank line included), padded by X-Pad."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *fields]
    padding = size - len("\r\n".join([*lines, "X-Pad: "]) + "\r\n\r\n")
    assert padding >= 0, f"a head of {size} bytes cannot hold {lines}"
    return ("\r\n".join([*lines, "X-Pad: " + "a" * padding]) + "\r\n\r\n").encode("latin-1")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECONDS)


def read_response(connection: socket.socket) -> RawResponse:
    """One response on a keep-alive connection (the service always sends Content-Length)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"the server closed the connection; received {received[:200]!r}"
        received += chunk
    header_block, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers["content-length"]):
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection in the middle of a body"
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body)


def exchange(port: int, request: bytes) -> tuple[RawResponse, bool]:
    """`request` on a new connection: the response, and whether the server closed the
    connection after it (only looked at when the response announces it)."""
    with closing(connect(port)) as connection:
        connection.sendall(request)
        response = read_response(connection)
        return response, response.headers.get("connection") == "close" and is_closed(connection)


def is_closed(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def assert_refused(response: RawResponse, closed: bool, limit: str) -> None:
    assert response.status == 431, response
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close" and closed
    assert limit in orjson.loads(response.body)["error"]


def infer_request(head_size: int, rows: int) -> bytes:
    """POST mlp/infer: a head of exactly `head_size` bytes, then a body of `rows` x 8 floats."""
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, 8],
                    "datatype": "FP32",
                    "data": [0.25] * (rows * 8),
                }
            ]
        }
    )
    fields = ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return head(head_size, "/v2/models/mlp/infer", "POST", fields) + body


# ---------------------------------------------------------------- bytes and fields


def test_a_head_at_the_limit_is_served_one_byte_more_is_refused(
    limited_server: ServerProcess,
) -> None:
    port = limited_server.port
    response, _ = exchange(port, head(MAX_HEADER_BYTES))
    assert response.status == 200
    # the body is not head: one larger than the limit, in the same write, is read as body
    request = infer_request(MAX_HEADER_BYTES, rows=600)
    assert len(request) > 2 * MAX_HEADER_BYTES
    response, _ = exchange(port, request)
    assert response.status == 200, response.body
    assert_refused(*exchange(port, head(MAX_HEADER_BYTES + 1)), f"{MAX_HEADER_BYTES} bytes")


def test_too_many_header_fields_are_refused(limited_server: ServerProcess) -> None:
    port = limited_server.port
    fields = [f"X-Field-{index}: {index}" for index in range(MAX_HEADER_COUNT - 2)]
    response, _ = exchange(port, head(1024, fields=fields))  # + Host and X-Pad
    assert response.status == 200
    refused = head(1024, fields=[*fields, "X-One-Too-Many: 1"])
    assert_refused(*exchange(port, refused), f"{MAX_HEADER_COUNT} header fields")


def test_a_long_url_is_refused(limited_server: ServerProcess) -> None:
    request = f"GET /v2/health/live?q={'q' * MAX_HEADER_BYTES} HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_refused(*exchange(limited_server.port, request.encode()), f"{MAX_HEADER_BYTES} bytes")


def test_each_request_on_a_keep_alive_connection_has_its_own_budget(
    limited_server: ServerProcess,
) -> None:
    """Three quarters of the limit, three times on one connection: the count restarts per
    request (after a body, too); one byte over the limit is still refused there."""
    three_quarters = MAX_HEADER_BYTES * 3 // 4
    with closing(connect(limited_server.port)) as connection:
        for request in (head(three_quarters), infer_request(three_quarters, rows=2)):
            for _ in range(2):
                connection.sendall(request)
                assert read_response(connection).status == 200
        connection.sendall(head(MAX_HEADER_BYTES + 1))
        assert_refused(read_response(connection), is_closed(connection), "bytes")


# ---------------------------------------------------------------- a slow, endless head


def test_an_endless_head_is_cut_off_while_health_checks_answer(
    limited_server: ServerProcess,
) -> None:
    """8 MiB of one header in 64 KiB writes: the 431 arrives long before the end (the server
    stops feeding its parser at the limit), and health checks on another connection answer
    throughout."""
    total, chunk = 8 << 20, b"a" * (64 << 10)
    port = limited_server.port
    stop = threading.Event()
    statuses: list[int] = []
    failures: list[BaseException] = []

    def check_health() -> None:
        try:
            with closing(connect(port)) as connection:
                while not stop.is_set():
                    connection.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                    statuses.append(read_response(connection).status)
                    time.sleep(0.01)
        except (OSError, AssertionError) as exc:
            failures.append(exc)

    checker = threading.Thread(target=check_health, name="health-checks")
    checker.start()
    sent = 0
    try:
        with closing(connect(port)) as connection:
            connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            while sent < total and not select.select([connection], [], [], 0)[0]:
                try:
                    connection.sendall(chunk)
                except OSError:  # refused and closed: the send fails
                    break
                sent += len(chunk)
                time.sleep(0.005)
            readable = select.select([connection], [], [], SOCKET_TIMEOUT_SECONDS)[0]
            assert readable, f"no answer after {sent} bytes of an endless head"
            try:
                response = read_response(connection)
            except ConnectionResetError:
                response = None  # the server closed first: the other acceptable ending
    finally:
        stop.set()
        checker.join(timeout=30)
    assert sent < total, "the server read the whole 8 MiB head without refusing it"
    assert response is None or response.status == 431
    assert not failures and statuses and set(statuses) == {200}


# ---------------------------------------------------------------- how the limits are applied


def test_workers_spawned_by_uvicorn_enforce_the_limit(reliability_repository: Path) -> None:
    """--workers 2: uvicorn pickles the protocol factory into spawned processes."""
    with server_process(
        reliability_repository, "--workers", "2", "--max-header-bytes", "4096"
    ) as server:
        for _ in range(4):  # every worker is a spawned process; four connections reach both, likely
            response, _ = exchange(server.port, head(4096))
            assert response.status == 200
            assert_refused(*exchange(server.port, head(4097)), "4096 bytes")


def test_the_default_limit_holds_on_the_test_server(reliability_service: RunningServer) -> None:
    """tests/service_server.py runs what `bnfold serve` runs: 64 KiB by default."""
    limit = Settings.model_fields["max_header_bytes"].default
    assert limit == 64 * 1024
    response, _ = exchange(reliability_service.port, head(limit))
    assert response.status == 200
    assert_refused(*exchange(reliability_service.port, head(limit + 1)), f"{limit} bytes")


def test_the_options_carry_the_limits_to_both_protocols(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(max_header_bytes=4096, max_header_count=7)
    options = uvicorn_options(settings)
    assert options["h11_max_incomplete_event_size"] == 4096
    factory = pickle.loads(pickle.dumps(options["http"]))  # what --workers N does with it
    assert factory.func is HeadLimitedProtocol
    assert factory.keywords == {"limits": HeadLimits(max_bytes=4096, max_fields=7)}
    monkeypatch.setitem(sys.modules, "httptools", None)  # find_spec: not installed
    options = uvicorn_options(settings)
    assert options["http"] == "h11" and options["h11_max_incomplete_event_size"] == 4096
