"""Security: the request head (request line and header fields) is capped in bytes and fields.

Before the cap, uvicorn buffered a head of any size and its parser built it by
concatenation: a 64 MiB header was answered after 6 s, 128 MiB after 24 s
(quadratic), and health checks on other connections stalled for seconds
meanwhile. Now the bytes from a request's first byte to the end of its head
are counted, and past `--max-header-bytes` or `--max-header-count` the client
gets `431 Request Header Fields Too Large` with a V2 JSON error naming the limit,
and the connection closes (service/http_protocol.py). A chunked body's trailer
fields are held to the same limits, and a head behind the end of a body too.

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

from bnfold.service.http_protocol import (
    LINGER_SECONDS,
    ClientLimits,
    GuardedProtocol,
    HeadLimits,
    RefusalLog,
)
from bnfold.service.server_options import uvicorn_options
from bnfold.service.settings import Settings

from .harness import RawResponse, ServerProcess, metric, server_process, wait_for_metric
from service_server import RunningServer

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_COUNT = 20
SOCKET_TIMEOUT_SECONDS = 10.0
ENDLESS_BYTES, ENDLESS_WRITE = 8 << 20, b"a" * (64 << 10)
IN_FLIGHT = "bnfold_requests_in_flight"


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


# Bytes received past the response read, per connection: two pipelined responses may
# arrive in one recv (on a busy machine they did, and the second one was lost).
_UNREAD: dict[int, bytes] = {}


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECONDS)
    _UNREAD.pop(connection.fileno(), None)  # left by an earlier socket with this descriptor
    return connection


def read_response(connection: socket.socket) -> RawResponse:
    """One response on a keep-alive connection (the service always sends Content-Length)."""
    received = _UNREAD.pop(connection.fileno(), b"")
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
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection in the middle of a body"
        body += chunk
    if len(body) > length:
        _UNREAD[connection.fileno()] = body[length:]
    return RawResponse(int(status_line.split()[1]), headers, body[:length])


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


def infer_body(rows: int) -> bytes:
    """A V2 inference request for mlp: `rows` x 8 floats."""
    return orjson.dumps(
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


def infer_request(head_size: int, rows: int) -> bytes:
    """POST mlp/infer: a head of exactly `head_size` bytes, then a body of `rows` x 8 floats."""
    body = infer_body(rows)
    fields = ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return head(head_size, "/v2/models/mlp/infer", "POST", fields) + body


def chunked_infer_head() -> bytes:
    """POST mlp/infer with a chunked body: 3 header fields, the body and trailers to follow."""
    return (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


def chunks(body: bytes, size: int) -> bytes:
    """`body` as chunks of `size` bytes, without the last (empty) chunk."""
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)


def trailers(count: int) -> bytes:
    """The last chunk and `count` trailer fields: the end of a chunked body."""
    return b"0\r\n" + b"".join(b"X-Trailer-%d: %d\r\n" % (i, i) for i in range(count)) + b"\r\n"


def answered_partial_post(connection: socket.socket) -> bytes:
    """POST half of a 100-byte body to a GET-only path: the 405 comes before the body ends.
    Returns the other half, which the server still reads (and discards) as body."""
    connection.sendall(b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    connection.sendall(b"b" * 50)
    assert read_response(connection).status == 405
    return b"b" * 50


def endless_answer(connection: socket.socket, opening: bytes) -> tuple[int, RawResponse | None]:
    """`opening`, then up to 8 MiB of `a` in 64 KiB writes until the server answers or closes:
    the bytes of `a` sent, and the answer (None: the server reset the connection first)."""
    connection.sendall(opening)
    sent = 0
    while sent < ENDLESS_BYTES and not select.select([connection], [], [], 0)[0]:
        try:
            connection.sendall(ENDLESS_WRITE)
        except OSError:  # refused and closed: the send fails
            break
        sent += len(ENDLESS_WRITE)
        time.sleep(0.005)
    readable = select.select([connection], [], [], SOCKET_TIMEOUT_SECONDS)[0]
    assert readable, f"no answer after {sent} bytes of an endless section"
    try:
        return sent, read_response(connection)
    except ConnectionResetError:
        return sent, None  # the server closed first: the other acceptable ending


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
    try:
        with closing(connect(port)) as connection:
            opening = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: "
            sent, response = endless_answer(connection, opening)
    finally:
        stop.set()
        checker.join(timeout=30)
    assert sent < ENDLESS_BYTES, "the server read the whole 8 MiB head without refusing it"
    assert response is None or response.status == 431
    assert not failures and statuses and set(statuses) == {200}


# ---------------------------------------------------------------- behind a body, and trailers


def test_a_head_behind_the_end_of_a_body_is_refused(limited_server: ServerProcess) -> None:
    """A body answered before it ended, then its last bytes and a pipelined head with one field
    too many in one write: the head is refused and the connection closes (the count of a head
    that begins in the read where a body ends was once never checked: no 431, no close, and
    the keep-alive timer stopped, so the connection stayed open for good)."""
    fields = [f"X-Field-{index}: {index}" for index in range(MAX_HEADER_COUNT - 1)]
    with closing(connect(limited_server.port)) as connection:
        rest_of_body = answered_partial_post(connection)
        connection.sendall(rest_of_body + head(1024, fields=fields))
        response = read_response(connection)
        assert_refused(response, is_closed(connection), f"{MAX_HEADER_COUNT} header fields")


def test_an_endless_head_behind_the_end_of_a_body_is_cut_off(
    limited_server: ServerProcess,
) -> None:
    """The bytes of a pipelined head in the read where a body ends are not counted, so that
    head can pass the limit by one read (up to 256 KiB), not more: an endless one is refused."""
    with closing(connect(limited_server.port)) as connection:
        opening = answered_partial_post(connection) + b"GET / HTTP/1.1\r\nX-Endless: "
        sent, response = endless_answer(connection, opening)
    assert sent < ENDLESS_BYTES, "the server read the whole 8 MiB head without refusing it"
    assert response is None or response.status == 431


def test_a_chunked_body_in_small_chunks_with_trailers_is_served(
    limited_server: ServerProcess,
) -> None:
    """Chunk framing is not head: 4-byte chunks put more than the byte limit in chunk
    headers and line ends; trailer fields up to the field limit (with the head's 3) pass."""
    body = infer_body(rows=600)
    assert len(chunks(body, 4)) - len(body) > MAX_HEADER_BYTES
    request = chunked_infer_head() + chunks(body, 4) + trailers(MAX_HEADER_COUNT - 3)
    response, _ = exchange(limited_server.port, request)
    assert response.status == 200, response.body
    assert orjson.loads(response.body)["outputs"][0]["shape"][0] == 600


def test_too_many_trailer_fields_are_refused_and_the_app_stops_waiting(
    limited_server: ServerProcess,
) -> None:
    """Trailer fields count with the head's: one too many gets the 431, and the app, which
    was waiting for the rest of the body, sees a disconnect at once, not when the connection
    closes (those trailers once left it waiting until the client went away)."""
    url = limited_server.url
    with closing(connect(limited_server.port)) as connection:
        connection.sendall(chunked_infer_head() + chunks(infer_body(rows=2), 64))
        wait_for_metric(url, IN_FLIGHT, 1, SOCKET_TIMEOUT_SECONDS, endpoint="infer")
        # with the head's Host, Content-Type and Transfer-Encoding: one field too many
        connection.sendall(trailers(MAX_HEADER_COUNT - 2))
        response = read_response(connection)
        refused_at = time.monotonic()
        assert_refused(response, is_closed(connection), f"{MAX_HEADER_COUNT} header fields")
        # well before the lingering close ends the connection (and so the wait) anyway
        while metric(url, IN_FLIGHT, endpoint="infer") > 0:
            assert time.monotonic() - refused_at < LINGER_SECONDS / 2, "the app still waits"
            time.sleep(0.01)


def test_too_many_trailer_fields_behind_another_request_are_refused_in_turn(
    limited_server: ServerProcess,
) -> None:
    """Pipelined behind a request still being served, a request refused in its trailers is
    answered 431 after that request's response (closing at once would cut it off)."""
    request = infer_request(512, rows=2)
    request += chunked_infer_head() + chunks(infer_body(rows=2), 64)
    request += trailers(MAX_HEADER_COUNT - 2)
    with closing(connect(limited_server.port)) as connection:
        connection.sendall(request)
        assert read_response(connection).status == 200
        response = read_response(connection)
        assert_refused(response, is_closed(connection), f"{MAX_HEADER_COUNT} header fields")


def test_an_endless_trailer_is_cut_off(limited_server: ServerProcess) -> None:
    """Trailer bytes have a budget of their own: an 8 MiB trailer field is refused long
    before its end (it was once read whole, with time growing faster than its size)."""
    with closing(connect(limited_server.port)) as connection:
        opening = chunked_infer_head() + chunks(infer_body(rows=2), 64) + b"0\r\nX-Endless: "
        sent, response = endless_answer(connection, opening)
    assert sent < ENDLESS_BYTES, "the server read the whole 8 MiB trailer without refusing it"
    if response is not None:
        assert response.status == 431, response
        error = orjson.loads(response.body)["error"]
        assert f"trailer fields exceed {MAX_HEADER_BYTES} bytes" in error


def test_a_websocket_upgrade_with_too_many_fields_is_refused(
    limited_server: ServerProcess,
) -> None:
    """httptools reports the upgrade of a refused head too: it gets its 431 like any other
    (it once reached uvicorn's upgrade with half a scope: an error logged, no answer)."""
    fields = [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        *(f"X-Field-{index}: {index}" for index in range(MAX_HEADER_COUNT)),
    ]
    request = head(2048, "/v2/health/live", fields=fields)
    assert_refused(*exchange(limited_server.port, request), f"{MAX_HEADER_COUNT} header fields")


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
    settings = Settings(
        max_header_bytes=4096,
        max_header_count=7,
        header_timeout_seconds=3,
        body_timeout_seconds=4,
        max_connections=5,
        keep_alive_seconds=6,
    )
    options = uvicorn_options(settings)
    assert options["h11_max_incomplete_event_size"] == 4096
    assert options["timeout_keep_alive"] == 6
    factory = pickle.loads(pickle.dumps(options["http"]))  # what --workers N does with it
    assert factory.func is GuardedProtocol
    head = HeadLimits(max_bytes=4096, max_fields=7)
    assert factory.keywords["limits"] == ClientLimits(head, 3, 4, 5)
    assert isinstance(factory.keywords["refusal_log"], RefusalLog)
    monkeypatch.setitem(sys.modules, "httptools", None)  # find_spec: not installed
    options = uvicorn_options(settings)
    assert options["http"] == "h11" and options["h11_max_incomplete_event_size"] == 4096
