"""Slow and idle clients: the HTTP server bounds them itself, with no proxy in front.

A request head must arrive within `--header-timeout-seconds` of the
connection opening or of its first byte, a body within `--body-timeout-seconds`
of its head: else `408 Request Timeout` with a V2 JSON error, and the
connection closes (half-close and linger, so the client reads the 408). An idle
keep-alive connection closes after `--keep-alive-seconds`. Past
`--max-connections` open connections a request on a new one gets 503 with
`Retry-After`. While the server drains, responses close their connections; at
shutdown a request partly received is finished first (service/http_protocol.py).

The timeouts run against a real `bnfold serve` process with 1 s limits (its
own cores: 50 slowloris connections and the test's clients must not share the
server's GIL); the connection limit and the drain hooks against in-process
servers (tests/service_server.py), where the test reaches the drain state and
the shutdown. Requests are written on raw sockets, byte by byte where the case
says so. Time bounds are generous upper limits; the lower ones prove a timer
did not fire early (the server's clock starts after the client's).
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bnfold.service.http_protocol import ReadClock
from bnfold.service.settings import Settings

from .harness import RawResponse, ServerProcess, metric, server_process
from .test_header_limits import (
    chunks,
    connect,
    is_closed,
    read_response,
    trailers,
)
from .traffic import PlannedRequest, decode_outputs, plan_request
from service_server import RunningServer, running_server

HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE = 1.0, 1.0, 1.0
SLACK = 3.0  # a busy 2-core machine: upper bounds are the limit plus this
EARLY = 0.05  # timer resolution: the server's clock starts after the client's
TRICKLE_SECONDS = 0.3
SLOWLORIS_CONNECTIONS, ATTACK_SECONDS = 50, 4.0
MAX_CONNECTIONS = 8
IN_FLIGHT = "bnfold_requests_in_flight"
HEALTH = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
SLOW_HEAD = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: "


@pytest.fixture(scope="module")
def timed_server(reliability_repository: Path) -> Iterator[ServerProcess]:
    with server_process(
        reliability_repository,
        "--header-timeout-seconds",
        str(HEADER_TIMEOUT),
        "--body-timeout-seconds",
        str(BODY_TIMEOUT),
        "--keep-alive-seconds",
        str(KEEP_ALIVE),
    ) as server:
        yield server


def assert_timed_out(
    response: RawResponse, connection: socket.socket, what: str, seconds: float
) -> None:
    assert response.status == 408, response
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close" and is_closed(connection)
    error = orjson.loads(response.body)["error"]
    assert what in error and f"within {seconds:g} s" in error, error


def trickle_until_answered(connection: socket.socket, data: bytes, limit: float) -> float:
    """Send `data` a byte every TRICKLE_SECONDS until the server answers (at most `limit` s):
    the seconds it took. Sends after the answer may fail: the server has closed."""
    started = time.monotonic()
    for byte in data:
        if _readable(connection, TRICKLE_SECONDS):
            return time.monotonic() - started
        assert time.monotonic() - started < limit, f"no answer within {limit} s of trickling"
        with suppress(OSError):
            connection.sendall(bytes([byte]))
    raise AssertionError(f"no answer after {len(data)} bytes, one every {TRICKLE_SECONDS} s")


def _readable(connection: socket.socket, seconds: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ)
        return bool(selector.select(seconds))


def planned(repository: Path, rows: int, seed: int) -> PlannedRequest:
    return plan_request(repository, "mlp", rows, np.random.default_rng(seed), binary=False)


def post_head(request: PlannedRequest, chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(request.content)}"
    fields = [f"{name}: {value}" for name, value in request.headers.items()]
    lines = [f"POST {request.path} HTTP/1.1", "Host: x", framing, *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_answers(response: RawResponse, request: PlannedRequest) -> None:
    assert response.status == 200, response
    outputs = decode_outputs(response.body, response.headers)
    for name, expected in request.expected.items():
        # the server's session and the reference run the same graph on the same provider
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-5, atol=1e-6)


def send_slowly(connection: socket.socket, data: bytes, pieces: int, seconds: float) -> None:
    """`data` in `pieces` writes spread over `seconds`."""
    size = -(-len(data) // pieces)
    for start in range(0, len(data), size):
        connection.sendall(data[start : start + size])
        time.sleep(seconds / pieces)


# ---------------------------------------------------------------- heads


def test_a_slowloris_head_is_answered_408_and_closed(timed_server: ServerProcess) -> None:
    with closing(connect(timed_server.port)) as connection:
        connection.sendall(SLOW_HEAD)
        seconds = trickle_until_answered(connection, b"a" * 100, HEADER_TIMEOUT + SLACK)
        assert seconds >= HEADER_TIMEOUT - EARLY
        assert_timed_out(read_response(connection), connection, "header fields", HEADER_TIMEOUT)
    print(f"FIGURE slowloris head: 1 byte every {TRICKLE_SECONDS} s, 408 after {seconds:.2f} s")


def test_a_connection_that_sends_nothing_gets_408(timed_server: ServerProcess) -> None:
    with closing(connect(timed_server.port)) as connection:
        started = time.monotonic()
        assert _readable(connection, HEADER_TIMEOUT + SLACK), "still open, nothing said"
        seconds = time.monotonic() - started
        assert seconds >= HEADER_TIMEOUT - EARLY
        assert_timed_out(read_response(connection), connection, "header fields", HEADER_TIMEOUT)
    print(f"FIGURE silent connection: 408 after {seconds:.2f} s")


def test_heads_slow_but_in_time_are_served_each_with_its_own_clock(
    timed_server: ServerProcess,
) -> None:
    """Two heads, each spread over 0.6 s, 0.5 s apart on one connection: both served, though
    the second ends well past a header timeout after the connection opened."""
    with closing(connect(timed_server.port)) as connection:
        opened = time.monotonic()
        for _ in range(2):
            send_slowly(connection, HEALTH, pieces=4, seconds=0.6 * HEADER_TIMEOUT)
            assert read_response(connection).status == 200
            time.sleep(0.5 * KEEP_ALIVE)
        assert time.monotonic() - opened > HEADER_TIMEOUT


def test_an_idle_keep_alive_connection_is_closed_without_a_response(
    timed_server: ServerProcess,
) -> None:
    with closing(connect(timed_server.port)) as connection:
        connection.sendall(HEALTH)
        assert read_response(connection).status == 200
        answered = time.monotonic()
        assert _readable(connection, KEEP_ALIVE + SLACK), "an idle connection stayed open"
        seconds = time.monotonic() - answered
        assert connection.recv(1) == b""  # closed, no 408: nothing was asked
        # the timer starts before the client reads the response: a loose lower bound
        assert seconds >= KEEP_ALIVE / 2
    print(f"FIGURE idle keep-alive: closed {seconds:.2f} s after the response")


def test_a_connection_used_more_often_than_the_keep_alive_stays_open_then_closes_when_idle(
    timed_server: ServerProcess,
) -> None:
    """One keep-alive timer per connection, armed at its first idle moment: when it fires
    on a connection that was used meanwhile, it waits for the rest of the idle time since
    the last response instead of closing (http_protocol.py, the keep-alive timer)."""
    gap = 0.6 * KEEP_ALIVE
    with closing(connect(timed_server.port)) as connection:
        opened = time.monotonic()
        for _ in range(5):  # 2.4 keep-alive periods of use, each gap shorter than one
            connection.sendall(HEALTH)
            assert read_response(connection).status == 200
            assert not _readable(connection, gap), "closed while in use"
        assert time.monotonic() - opened > 2 * KEEP_ALIVE
        connection.sendall(HEALTH)
        assert read_response(connection).status == 200
        answered = time.monotonic()
        assert _readable(connection, KEEP_ALIVE + SLACK), "an idle connection stayed open"
        seconds = time.monotonic() - answered
        assert connection.recv(1) == b""
        assert seconds >= KEEP_ALIVE / 2  # counted from the last response, not the first
    print(f"FIGURE keep-alive after use: closed {seconds:.2f} s after the last response")


def test_pipelined_requests_are_served(timed_server: ServerProcess) -> None:
    with closing(connect(timed_server.port)) as connection:
        connection.sendall(HEALTH * 3)
        assert [read_response(connection).status for _ in range(3)] == [200] * 3


# ---------------------------------------------------------------- bodies


def test_a_trickled_body_gets_408_and_the_request_ends_quietly(
    timed_server: ServerProcess, reliability_repository: Path
) -> None:
    """One body byte every 0.3 s: 408 within the body timeout, the app sees a disconnect
    (the request leaves the in-flight gauge) and the server logs no traceback."""
    request = planned(reliability_repository, rows=4, seed=1)
    with closing(connect(timed_server.port)) as connection:
        connection.sendall(post_head(request))
        seconds = trickle_until_answered(connection, request.content, BODY_TIMEOUT + SLACK)
        assert seconds >= BODY_TIMEOUT - EARLY
        assert_timed_out(read_response(connection), connection, "request body", BODY_TIMEOUT)
    deadline = time.monotonic() + SLACK
    while metric(timed_server.url, IN_FLIGHT, endpoint="infer") > 0:
        assert time.monotonic() < deadline, "the app still waits for the body"
        time.sleep(0.02)
    log = timed_server.log_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    print(f"FIGURE trickled body: 1 byte every {TRICKLE_SECONDS} s, 408 after {seconds:.2f} s")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_slow_but_in_time_is_served(
    timed_server: ServerProcess, reliability_repository: Path, chunked: bool
) -> None:
    request = planned(reliability_repository, rows=64, seed=2)
    body = chunks(request.content, 512) + trailers(1) if chunked else request.content
    with closing(connect(timed_server.port)) as connection:
        connection.sendall(post_head(request, chunked))
        send_slowly(connection, body, pieces=4, seconds=0.6 * BODY_TIMEOUT)
        assert_answers(read_response(connection), request)


# ---------------------------------------------------------------- under attack


@dataclass
class SlowlorisOutcome:
    seconds: float
    status: int  # 0: reset before an answer


def slowloris_attack(
    port: int, stop: threading.Event, connections: int, seconds: float
) -> list[SlowlorisOutcome]:
    """`connections` connections, each sending a header byte every TRICKLE_SECONDS, each
    replaced when answered, until `stop` (at most `seconds` + SLACK): the answered."""
    outcomes: list[SlowlorisOutcome] = []
    open_connections: dict[socket.socket, float] = {}
    deadline = time.monotonic() + seconds + SLACK
    with selectors.DefaultSelector() as selector:
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                while len(open_connections) < connections:
                    connection = connect(port)
                    connection.sendall(SLOW_HEAD)
                    open_connections[connection] = time.monotonic()
                    selector.register(connection, selectors.EVENT_READ)
                for key, _ in selector.select(TRICKLE_SECONDS):
                    connection = key.fileobj  # type: ignore[assignment]
                    selector.unregister(connection)
                    opened = open_connections.pop(connection)  # type: ignore[arg-type]
                    try:
                        status = read_response(connection).status  # type: ignore[arg-type]
                    except (ConnectionResetError, AssertionError):
                        status = 0
                    outcomes.append(SlowlorisOutcome(time.monotonic() - opened, status))
                    connection.close()  # type: ignore[union-attr]
                for connection in open_connections:
                    with suppress(OSError):
                        connection.sendall(b"a")
        finally:
            for connection in open_connections:
                connection.close()
    return outcomes


@pytest.mark.parametrize(
    ("connections", "seconds"),
    [
        pytest.param(SLOWLORIS_CONNECTIONS, ATTACK_SECONDS, id="50-for-4s"),
        pytest.param(400, 60.0, id="soak-400-for-60s", marks=[pytest.mark.soak]),
    ],
)
def test_health_and_inference_answer_during_a_slowloris_attack(
    timed_server: ServerProcess, reliability_repository: Path, connections: int, seconds: float
) -> None:
    """`connections` slowloris connections held open for `seconds` (each replaced when
    refused): every one is answered 408 within the header timeout, and health checks and
    inferences on other connections keep answering, each within a second (they take
    milliseconds)."""
    request = planned(reliability_repository, rows=8, seed=3)
    stop = threading.Event()
    result: list[list[SlowlorisOutcome]] = []
    attacker = threading.Thread(
        target=lambda: result.append(
            slowloris_attack(timed_server.port, stop, connections, seconds)
        ),
        name="slowloris",
    )
    latencies: list[float] = []
    attacker.start()
    try:
        time.sleep(0.5)  # the attack is under way
        with httpx.Client(base_url=timed_server.url, timeout=10) as client:
            ends = time.monotonic() + seconds - 1.0
            while time.monotonic() < ends:
                started = time.monotonic()
                assert client.get("/v2/health/ready").status_code == 200
                response = client.post(request.path, content=request.content)
                latencies.append(time.monotonic() - started)
                assert_answers(RawResponse(200, dict(response.headers), response.content), request)
                assert response.status_code == 200
                time.sleep(0.05)
    finally:
        stop.set()
        attacker.join(timeout=seconds + 2 * SLACK)
    (outcomes,) = result
    assert len(outcomes) >= connections
    assert {outcome.status for outcome in outcomes} == {408}
    assert max(outcome.seconds for outcome in outcomes) < HEADER_TIMEOUT + SLACK
    assert min(outcome.seconds for outcome in outcomes) >= HEADER_TIMEOUT - EARLY
    assert max(latencies) < 1.0, latencies
    print(
        f"FIGURE slowloris attack: {connections} connections for {seconds:g} s, "
        f"{len(outcomes)} answered 408 after {min(o.seconds for o in outcomes):.2f}-"
        f"{max(o.seconds for o in outcomes):.2f} s, 0 lost; meanwhile {len(latencies)} "
        f"health + infer pairs, median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )


# ---------------------------------------------------------------- the connection limit


@pytest.fixture()
def limited_server(reliability_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        repository=reliability_repository, device="cpu", max_connections=MAX_CONNECTIONS
    )
    with running_server(settings) as server:
        yield server


def test_past_the_connection_limit_a_request_gets_503_and_the_first_ones_still_work(
    limited_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = limited_server.port
    admitted = [connect(port) for _ in range(MAX_CONNECTIONS)]
    try:
        for connection in admitted:
            connection.sendall(HEALTH)
            assert read_response(connection).status == 200
        started = time.monotonic()
        refusals = 5
        for _ in range(refusals):
            with closing(connect(port)) as extra:
                extra.sendall(HEALTH)
                response = read_response(extra)
                assert response.status == 503, response
                assert response.headers["retry-after"] == "1"
                assert response.headers["content-type"] == "application/json"
                assert response.headers["connection"] == "close" and is_closed(extra)
                assert f"limit of {MAX_CONNECTIONS}" in orjson.loads(response.body)["error"]
        seconds = time.monotonic() - started
        for connection in admitted:  # the first ones are not refused for the newcomers
            connection.sendall(HEALTH)
            assert read_response(connection).status == 200
    finally:
        for connection in admitted:
            connection.close()
    warnings = [r for r in caplog.records if "Refused a request with 503" in r.getMessage()]
    assert 1 <= len(warnings) <= 1 + int(seconds), "one warning a second at most"
    # once they have closed, new connections are served (the server sees the closes soon)
    deadline = time.monotonic() + SLACK
    while True:
        with closing(connect(port)) as connection:
            connection.sendall(HEALTH)
            if read_response(connection).status == 200:
                break
        assert time.monotonic() < deadline, "still refused after the first connections closed"
        time.sleep(0.05)
    print(
        f"FIGURE connection limit {MAX_CONNECTIONS}: {refusals} newcomers answered 503 + "
        f"Retry-After, {MAX_CONNECTIONS} admitted still served, {len(warnings)} warning line(s)"
    )


# ---------------------------------------------------------------- the drain hooks


@pytest.fixture()
def stoppable_server(
    reliability_repository: Path,
) -> Iterator[tuple[RunningServer, Callable[[], None]]]:
    """An in-process server and what stops it as `bnfold serve` stops (uvicorn's shutdown:
    stop listening, `shutdown()` on each connection, wait for them), for a test to call."""
    settings = Settings(repository=reliability_repository, device="cpu", header_timeout_seconds=5)
    with ExitStack() as stack:
        server = stack.enter_context(running_server(settings))
        yield server, stack.close


def test_while_draining_each_response_closes_its_connection(
    stoppable_server: tuple[RunningServer, Callable[[], None]],
) -> None:
    server, _ = stoppable_server
    with closing(connect(server.port)) as connection:
        connection.sendall(HEALTH)
        response = read_response(connection)
        assert response.status == 200 and "connection" not in response.headers
        server.app.state.drain_window.state.draining = True  # what SIGTERM does first
        connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_response(connection)
        assert response.status == 200
        assert response.headers["connection"] == "close" and is_closed(connection)


def test_at_shutdown_a_request_partly_received_is_finished_and_others_close(
    stoppable_server: tuple[RunningServer, Callable[[], None]], reliability_repository: Path
) -> None:
    """uvicorn stops: the silent and the idle connections close at once; one with half a head
    and one with half a body are kept, and each request is answered with Connection: close."""
    server, stop = stoppable_server
    request = planned(reliability_repository, rows=4, seed=4)
    silent, idle, half_head, half_body = (connect(server.port) for _ in range(4))
    try:
        idle.sendall(HEALTH)
        assert read_response(idle).status == 200
        half_head.sendall(HEALTH[:20])
        half_body.sendall(post_head(request) + request.content[:10])
        time.sleep(0.1)  # the server has read them
        stopper = threading.Thread(target=stop, name="uvicorn-stop")
        stopper.start()
        for connection in (silent, idle):
            assert _readable(connection, SLACK) and connection.recv(1) == b""
        half_head.sendall(HEALTH[20:])
        half_body.sendall(request.content[10:])
        response = read_response(half_head)
        assert response.status == 200 and response.headers["connection"] == "close"
        response = read_response(half_body)
        assert_answers(response, request)
        assert response.headers["connection"] == "close"
        assert is_closed(half_head) and is_closed(half_body)
        stopper.join(timeout=15)
        assert not stopper.is_alive()
    finally:
        for connection in (silent, idle, half_head, half_body):
            connection.close()


# ---------------------------------------------------------------- the clock


def test_the_read_clock_stops_while_reading_is_paused() -> None:
    """The timeouts run on `ReadClock`: time the server spends not reading (uvicorn's flow
    control) is not the client's. On a real loop and socket transport."""

    async def measure() -> tuple[float, float, float, float, float]:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        clock = ReadClock(writer.transport, loop)  # type: ignore[arg-type]
        begun, wall_begun = clock.now(), loop.time()
        await asyncio.sleep(0.1)
        clock.pause_reading()
        paused_at = clock.now()
        await asyncio.sleep(0.3)
        still = clock.now()
        clock.resume_reading()
        await asyncio.sleep(0.1)
        ended, wall = clock.now(), loop.time() - wall_begun
        writer.close()
        server.close()
        return begun, paused_at, still, ended, wall

    begun, paused_at, still, ended, wall = asyncio.run(measure())
    assert still == paused_at  # stopped while paused
    assert paused_at - begun >= 0.1 - EARLY and ended - still >= 0.1 - EARLY  # runs otherwise
    assert ended - begun <= wall - 0.3  # the 0.3 s (or more) paused are not in it
