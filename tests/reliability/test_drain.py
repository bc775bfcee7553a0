"""SIGTERM with a drain window: every request a client has sent is answered, none is reset.

`bnfold serve --drain-seconds D` on SIGTERM says not ready (/v2/health/ready
503, gRPC ServerReady false) for D seconds while it keeps accepting and
answering, every HTTP response carrying `Connection: close`; then it stops
listening (a new connection is refused, not reset) and gives the requests in
flight the grace period (service/drain.py).

The burst (`_burst`): CLIENTS keep-alive clients send back to back, most to the
quick `mlp`, some to `slow`, and reconnect when answered Connection: close.
SIGTERM comes 0.3 s into it. They stop sending BALANCER_SECONDS after the
signal: what a balancer that follows readiness (or a Kubernetes endpoint
update) takes to send them elsewhere, which the window must outlast. One more
request, sent 0.4 s before the window ends, runs across its end: it is in
flight when the server stops listening. A prober reads readiness through the
window and tries to connect after it. What a client that keeps opening
connections through the very end of the window meets is not tested here:
RELIABILITY.md lists it among the residual races.

The state machine itself (`DrainWindow`) and the signal chaining are tested
in-process below, where a test can call `DrainWindow.signal` in place of a
signal, and raise real ones in the main thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bnfold.service.drain import DrainState, DrainWindow, drain_on_exit_signals

from .harness import Connection, ServerProcess, server_process, wait_for_exit
from .traffic import PlannedRequest, mismatches, plan_request, random_inputs, reference_session
from service_server import grpc_settings, running_server

CLIENTS, SLOW_CLIENTS = 40, 4
SLOW_ROWS = 512  # about 90 ms of the slow model on one core
# the slow clients pause between requests: a model queue that never empties holds the one
# run slot for its own model, and the mlp requests would wait seconds
SLOW_PAUSE = 0.2
STRADDLER_ROWS = 24576  # 1 s (AVX-512, 2 cores) to 3 s: in flight when the window ends
DRAIN, GRACE = 3.0, 10.0
SIGNAL_AFTER = 0.3
BALANCER_SECONDS = 2.0
# the window may end a little late: the loop is busy, uvicorn looks at its exit flag every
# 0.1 s, the supervisor of --workers passes SIGTERM on. 0.3 s once was not enough on a
# loaded CI machine: a probe got in before the listener closed, and uvicorn's shutdown
# reset it (the server exits 7 s after the signal, so probing from 1 s on loses nothing)
LATE = 1.0


@dataclass(frozen=True)
class Sent:
    """One request written to a socket, and what came back (status 0: nothing)."""

    model: str
    started: float
    ended: float
    status: int
    headers: dict[str, str]
    body: bytes
    error: str


@dataclass
class Burst:
    sent: list[Sent] = field(default_factory=list)
    refused_connects: list[tuple[float, str]] = field(default_factory=list)
    readiness: list[tuple[float, tuple[int, bytes] | str]] = field(default_factory=list)
    after_window: list[tuple[float, tuple[int, bytes] | str]] = field(default_factory=list)


async def _send(connection: Connection, model: str, planned: PlannedRequest, burst: Burst) -> bool:
    """Connect if need be (a refusal is recorded, and ends the client), then send one request."""
    try:
        await connection.connect()
    except OSError as exc:
        burst.refused_connects.append((time.monotonic(), repr(exc)))
        return False
    started = time.monotonic()
    outcome = await connection.post(0, planned.path, planned.content, planned.headers)
    burst.sent.append(
        Sent(
            model,
            started,
            time.monotonic(),
            outcome.status,
            outcome.headers,
            outcome.body,
            outcome.error,
        )
    )
    return True


def _probe(port: int, target: str) -> tuple[int, bytes] | str:
    """GET `target` on a new connection: (status, body), or the name of what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    return "EOF without an answer"
                received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length and (chunk := connection.recv(65536)):
                body += chunk
            return int(head.split()[1]), body
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _burst(server: ServerProcess, repository: Path, workers: int) -> tuple[Burst, float, float]:
    """The burst, SIGTERM, the probes; returns what happened, the signal's time and the
    seconds to the exit."""
    rng = np.random.default_rng(17)
    quick = plan_request(repository, "mlp", 4, rng, binary=False)
    slow = plan_request(repository, "slow", SLOW_ROWS, rng, binary=True)
    straddler = plan_request(repository, "slow", STRADDLER_ROWS, rng, binary=True)
    burst = Burst()
    started = time.monotonic()
    signalled = started + SIGNAL_AFTER
    stop_sending = signalled + BALANCER_SECONDS
    window_over = signalled + DRAIN

    async def client(index: int) -> None:
        model, planned = ("slow", slow) if index < SLOW_CLIENTS else ("mlp", quick)
        connection = Connection(server.port, timeout=60)
        try:
            while time.monotonic() < stop_sending:
                if not await _send(connection, model, planned, burst):
                    return
                if model == "slow":
                    await asyncio.sleep(SLOW_PAUSE)
        finally:
            await connection.close()

    async def straddle() -> None:
        await asyncio.sleep(max(0.0, window_over - 0.4 - time.monotonic()))
        connection = Connection(server.port, timeout=60)
        await _send(connection, "straddler", straddler, burst)
        await connection.close()

    async def load() -> None:
        await asyncio.gather(*(client(index) for index in range(CLIENTS)), straddle())

    def probe() -> None:
        while time.monotonic() < window_over - 0.3:
            # timed when the answer came: a probe sent just before the signal may be
            # answered after it, rightly with 503
            answer = _probe(server.port, "/v2/health/ready")
            burst.readiness.append((time.monotonic(), answer))
            time.sleep(0.05)
        # the listener closes at the window's end; probe once it surely has
        time.sleep(max(0.0, window_over + LATE - time.monotonic()))
        while True:  # at least once: a quick exit may come before the first probe
            exited = server.process.poll() is not None
            burst.after_window.append((time.monotonic(), _probe(server.port, "/v2/health/live")))
            if exited:
                break
            time.sleep(0.02)

    loader = threading.Thread(target=asyncio.run, args=(load(),), daemon=True)
    prober = threading.Thread(target=probe, daemon=True)
    loader.start()
    prober.start()
    time.sleep(max(0.0, signalled - time.monotonic()))
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    exited_after = wait_for_exit(server.process, DRAIN + GRACE + 10)
    loader.join(60)
    prober.join(30)
    assert not loader.is_alive() and not prober.is_alive()
    for planned, name in ((quick, "mlp"), (slow, "slow"), (straddler, "straddler")):
        for sent in burst.sent:
            if sent.model == name and sent.status == 200:
                assert not mismatches(planned, sent.body, sent.headers), name
    return burst, signalled, exited_after


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_window_answers_every_request_sent(
    reliability_repository: Path, workers: int
) -> None:
    options = ("--drain-seconds", str(DRAIN), "--shutdown-grace", str(GRACE))
    with server_process(reliability_repository, *options, "--workers", str(workers)) as server:
        burst, signalled, exited_after = _burst(server, reliability_repository, workers)
        log = server.log_text()
    margin = 0.1  # the signal's way to the workers
    statuses = Counter(sent.status for sent in burst.sent)
    by_model = Counter(sent.model for sent in burst.sent)
    in_window = [s for s in burst.sent if s.started > signalled + margin]
    readiness = [(t, a if isinstance(a, str) else a[0]) for t, a in burst.readiness]
    not_ready = [t for t, status in readiness if t > signalled and status == 503]
    after_window = Counter(a if isinstance(a, str) else "answered" for _, a in burst.after_window)
    print(
        f"FIGURE drain window ({workers} worker(s), drain {DRAIN:g} s, grace {GRACE:g} s, "
        f"{CLIENTS} clients): {len(burst.sent)} requests sent {dict(by_model)}, answered "
        f"{dict(statuses)}, resets {statuses.get(0, 0)}; {len(in_window)} sent in the window, "
        f"all Connection: close; ready 503 {not_ready[0] - signalled:.2f} s after SIGTERM; "
        f"new connections after the window: {dict(after_window)}; exit {exited_after:.2f} s "
        "after SIGTERM"
    )
    # every request written to a socket got an HTTP answer; no connection was refused
    assert not [s for s in burst.sent if s.status == 0], [s.error for s in burst.sent][:5]
    assert not burst.refused_connects, burst.refused_connects[:3]
    for sent in burst.sent:
        assert sent.status == 200 or (sent.status == 503 and "retry-after" in sent.headers)
    # inference went on in the window, each response closing its connection
    assert sum(s.status == 200 and s.model == "mlp" for s in in_window) >= CLIENTS
    assert all(s.headers.get("connection") == "close" for s in in_window)
    (straddler,) = [s for s in burst.sent if s.model == "straddler"]
    assert straddler.status == 200 and straddler.ended > signalled + DRAIN
    # readiness: 200 before the signal, 503 (naming the drain) within a second after
    assert all(status == 200 for t, status in readiness if t < signalled), readiness
    assert not_ready and not_ready[0] - signalled < 1.0
    assert all(status == 503 for t, status in readiness if t > signalled + 1.0), readiness
    assert b"draining for shutdown" in burst.readiness[-1][1][1]  # type: ignore[index]
    # after the window: refused, never reset
    assert set(after_window) == {"refused"}, after_window
    assert DRAIN < exited_after < DRAIN + GRACE + 3
    assert log.count(f"SIGTERM: draining for {DRAIN:g} s") == workers, log
    assert "Traceback" not in log, log


def test_supervisor_still_replaces_a_dead_worker_then_drains(reliability_repository: Path) -> None:
    """The supervisor of --workers (serve_cli.WorkerSupervisor) is uvicorn's until SIGTERM:
    a worker killed is replaced, and the new one drains with the other."""
    options = ("--drain-seconds", "1", "--workers", "2")
    with server_process(reliability_repository, *options) as server:
        started = re.findall(r"Started server process \[(\d+)\]", server.log_text())
        os.kill(int(started[0]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while server.log_text().count("Application startup complete") < 3:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.05)
        assert httpx.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        wait_for_exit(server.process, 20)
        log = server.log_text()
    assert "died" in log, log
    assert log.count("SIGTERM: draining for 1 s") == 2, log


# ---------------------------------------------------------------- gRPC


def _grpc_call(address: str, repository: Path, model: str, rows: int) -> Callable[[], None]:
    """One gRPC inference prepared in full (inputs, the onnxruntime reference, a connected
    channel): the function returned makes the call at once and checks the answer bit for
    bit."""
    inputs = random_inputs(model, rows, np.random.default_rng(rows))
    version = 2 if model == "mlp" else 1
    session = reference_session(repository / model / str(version) / "model.onnx")
    tensors = []
    for name, array in inputs.items():
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = triton.InferenceServerClient(address)
    client.is_server_live()  # the channel is connected: the call starts within milliseconds

    def call() -> None:
        try:
            result = client.infer(model, tensors)
        finally:
            client.close()
        for output in session.get_outputs():  # after the call: a large run takes seconds
            expected = session.run([output.name], inputs)[0]
            np.testing.assert_array_equal(result.as_numpy(output.name), expected)

    return call


def _grpc_infer(address: str, repository: Path, model: str, rows: int) -> None:
    """One gRPC inference, checked bit for bit against onnxruntime on the same package."""
    _grpc_call(address, repository, model, rows)()


def _server_ready(address: str) -> bool:
    client = triton.InferenceServerClient(address)
    try:
        return client.is_server_ready()
    finally:
        client.close()


def test_grpc_serves_through_the_window_not_ready_then_refuses(
    reliability_repository: Path,
) -> None:
    drain = 2.0
    options = ("--drain-seconds", str(drain), "--shutdown-grace", str(GRACE))
    with server_process(reliability_repository, *options) as server:
        (port,) = [
            line.rsplit(":", 1)[1].strip()
            for line in server.log if "bnfold.service: gRPC on" in line
        ]  # fmt: skip
        address = f"127.0.0.1:{port}"
        assert _server_ready(address)
        # prepared (and connected) before the signal: the call must start just before the
        # window's end, and preparing it took long enough on a loaded CI machine to miss it
        straddler = _grpc_call(address, reliability_repository, "slow", STRADDLER_ROWS)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while _server_ready(address):
            assert time.monotonic() - signalled < 1.0, "ServerReady still true 1 s after SIGTERM"
            time.sleep(0.02)
        _grpc_infer(address, reliability_repository, "mlp", 3)
        assert time.monotonic() - signalled < drain, "too slow to test inside the window"
        # a call in flight at the window's end is answered within the grace period
        time.sleep(max(0.0, signalled + drain - 0.3 - time.monotonic()))
        straddler()
        assert time.monotonic() > signalled + drain
        with pytest.raises(InferenceServerException):
            _grpc_infer(address, reliability_repository, "mlp", 3)
        exited_after = wait_for_exit(server.process, GRACE + 10)
        log = server.log_text()
    print(f"FIGURE drain window gRPC: exit {time.monotonic() - signalled:.2f} s after SIGTERM")
    assert exited_after < GRACE
    assert "gRPC: draining calls in flight" in log
    assert "Traceback" not in log, log


# ---------------------------------------------------------------- SIGINT, a second signal


def test_sigint_skips_the_window(reliability_repository: Path) -> None:
    with server_process(reliability_repository, "--drain-seconds", "30") as server:
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        wait_for_exit(server.process, 10)
        log = server.log_text()
    exited_after = time.monotonic() - signalled
    print(f"FIGURE SIGINT with --drain-seconds 30: exit {exited_after:.2f} s after it")
    assert exited_after < 5
    assert "draining for" not in log and "Shutting down" in log, log


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_ends_the_window(reliability_repository: Path, second: int) -> None:
    with server_process(reliability_repository, "--drain-seconds", "30") as server:
        server.process.send_signal(signal.SIGTERM)
        assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/v2/health/ready", timeout=10).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        signalled = time.monotonic()
        server.process.send_signal(second)
        wait_for_exit(server.process, 10)
        log = server.log_text()
    exited_after = time.monotonic() - signalled
    name = signal.Signals(second).name
    print(f"FIGURE second signal ({name}) in a 30 s window: exit {exited_after:.2f} s after it")
    assert exited_after < 5
    assert f"{name}: the drain window ends now" in log, log


# ---------------------------------------------------------------- in-process


def _run_window(
    drain_seconds: float, script: Callable[[DrainWindow], object], seconds: float
) -> tuple[DrainState, list[tuple[float, int]]]:
    """Feed `script` the window on a running loop, wait `seconds`; the state, and each
    (seconds since the start, signal) the window handed on."""
    state, ended = DrainState(), []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        window = DrainWindow(state, drain_seconds, 1.0, loop)
        window.when_ended(lambda signum: ended.append((loop.time() - started, signum)))
        script(window)
        await asyncio.sleep(seconds)

    asyncio.run(main())
    return state, ended


def test_sigterm_drains_then_hands_the_signal_on_once() -> None:
    state, ended = _run_window(0.3, lambda window: window.signal(signal.SIGTERM), 0.6)
    assert state.draining
    assert [signum for _, signum in ended] == [signal.SIGTERM]
    assert 0.3 <= ended[0][0] < 0.5


def test_draining_starts_at_once_and_nothing_is_handed_on_in_the_window() -> None:
    state, ended = _run_window(5.0, lambda window: window.signal(signal.SIGTERM), 0.2)
    assert state.draining and ended == []


@pytest.mark.parametrize(
    ("drain_seconds", "signals", "handed_on"),
    [
        (0.0, [signal.SIGTERM], [signal.SIGTERM]),  # no window: today's stop
        (5.0, [signal.SIGINT], [signal.SIGINT]),  # Ctrl-C never drains
        (5.0, [signal.SIGTERM, signal.SIGTERM], [signal.SIGTERM]),
        (5.0, [signal.SIGTERM, signal.SIGINT], [signal.SIGINT]),
        # after the window, each signal goes on to uvicorn (a second SIGINT forces its exit)
        (5.0, [signal.SIGINT, signal.SIGINT], [signal.SIGINT, signal.SIGINT]),
    ],
    ids=["no-window", "sigint", "sigterm-twice", "sigterm-sigint", "sigint-twice"],
)
def test_window_ends_at_once(
    drain_seconds: float, signals: list[int], handed_on: list[int]
) -> None:
    def script(window: DrainWindow) -> None:
        for signum in signals:
            window.signal(signum)

    state, ended = _run_window(drain_seconds, script, 0.3)
    assert state.draining
    assert [signum for _, signum in ended] == handed_on
    assert all(seconds < 0.1 for seconds, _ in ended)


def test_real_signals_go_through_the_window_to_the_previous_handler() -> None:
    """In the main thread, as in `bnfold serve`: SIGTERM starts the window, whose end calls
    the handler installed before (uvicorn's there); `restore` puts that handler back."""
    received: list[int] = []

    def previous(signum: int, frame: object) -> None:
        received.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    state = DrainState()
    try:

        async def main() -> None:
            window = DrainWindow(state, 0.2, 1.0, asyncio.get_running_loop())
            restore = drain_on_exit_signals(window)
            try:
                signal.raise_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
                assert state.draining and received == []
                await asyncio.sleep(0.4)
                assert received == [signal.SIGTERM]
            finally:
                restore()
            assert signal.getsignal(signal.SIGTERM) is previous

        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_in_process_window_readiness_rest_and_grpc(service_repository: Path) -> None:
    """A test server (no signals in its thread) drains when told: readiness 503 naming the
    drain, liveness, model readiness and inference as before (Connection: close), gRPC
    serving but not ready; gRPC refuses calls once the window is over."""
    settings = grpc_settings(service_repository, drain_seconds=1.0)
    with running_server(settings) as server:
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        server.app.state.drain_window.signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = httpx.get(server.url + "/v2/health/ready")
        for _ in range(50):
            if ready.status_code == 503:
                break
            time.sleep(0.01)
            ready = httpx.get(server.url + "/v2/health/ready")
        assert ready.status_code == 503
        assert "draining for shutdown" in ready.json()["error"]
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        assert httpx.get(server.url + "/v2/models/mlp/ready").status_code == 200
        body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32",
                            "data": [0.5] * 8}]}  # fmt: skip
        answer = httpx.post(server.url + "/v2/models/mlp/infer", json=body)
        assert answer.status_code == 200 and answer.headers["connection"] == "close"
        assert not _server_ready(server.grpc_address)
        client = triton.InferenceServerClient(server.grpc_address)
        try:
            assert client.is_server_live()
            assert time.monotonic() - signalled < 1.0, "too slow to test inside the window"
            time.sleep(max(0.0, signalled + 1.3 - time.monotonic()))
            with pytest.raises(InferenceServerException):
                client.is_server_live()
        finally:
            client.close()
