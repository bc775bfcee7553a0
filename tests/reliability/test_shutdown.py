"""SIGTERM: in-flight requests finish, new connections are refused, the process exits in time.

`bnfold serve` runs as its own process with a short `--shutdown-grace` and no
drain window (`--drain-seconds 0`: SIGTERM stops listening at once; the window
before it is test_drain.py's). Requests
to the slow model are put in flight (each has passed the model lookup, which
the /metrics counters show) before the signal:

* drain: the grace period is longer than the work in flight. Every request gets
  its full answer, the listening socket closes at once (a new connection is
  refused, with --workers 2 too: the supervisor closes its copy of the socket), and
  the process exits as soon as the work is done.
* bound: the work in flight is longer than the grace period. The process exits
  within the grace period plus one session run; requests it could not finish
  get 503 with Retry-After (never uvicorn's 500, never silence), the others
  their answers.

The default grace period (30 s) is Settings' default, which `bnfold serve`
hands to uvicorn (tests/test_service_cli.py).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from bnfold.service.settings import Settings

from .harness import (
    Connection,
    Outcome,
    ServerProcess,
    server_process,
    wait_for_exit,
    wait_for_metric,
)
from .traffic import PlannedRequest, assert_all_exact, mismatches, plan_request

ROWS = 1024  # about 170 ms of the slow model on one core


def _in_flight(
    url: str, planned: PlannedRequest, count: int
) -> tuple[list, list[threading.Thread]]:
    """`count` requests on their own connections, each answer (or exception) collected."""
    answers: list = []

    def send() -> None:
        try:
            response = httpx.post(
                url + planned.path, content=planned.content, headers=planned.headers, timeout=60
            )
        except httpx.HTTPError as exc:
            answers.append(exc)
        else:
            answers.append(response)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return answers, threads


def _wait_for_log(server: ServerProcess, text: str, timeout: float, times: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while server.log_text().count(text) < times:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{server.log_text()}"
        time.sleep(0.01)


def test_default_grace_period_is_30_seconds() -> None:
    assert Settings.model_fields["shutdown_grace_seconds"].default == 30.0


def _send_on_warm_connections(
    port: int, warm: PlannedRequest, planned: PlannedRequest, count: int
) -> tuple[threading.Event, threading.Event, list[Outcome], threading.Thread]:
    """Open `count` connections and send `warm` on each (so every connection is accepted by
    a worker), then `planned` on all of them at once. Returns (warmed, sent, outcomes, thread).

    A connection still in the listen backlog when shutdown starts is reset by the
    kernel, not by the server: only requests on accepted connections can be in flight.
    """
    warmed, sent = threading.Event(), threading.Event()
    outcomes: list[Outcome] = []

    async def main() -> None:
        connections = [Connection(port, timeout=60) for _ in range(count)]
        for index, connection in enumerate(connections):
            assert (
                await connection.post(index, warm.path, warm.content, warm.headers)
            ).status == 200
        warmed.set()

        async def one(index: int, connection: Connection) -> None:
            outcomes.append(
                await connection.post(index, planned.path, planned.content, planned.headers)
            )

        tasks = [asyncio.ensure_future(one(i, c)) for i, c in enumerate(connections)]
        await asyncio.sleep(0)
        sent.set()
        await asyncio.gather(*tasks)
        for connection in connections:
            await connection.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    return warmed, sent, outcomes, thread


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_in_flight_requests(reliability_repository: Path, workers: int) -> None:
    rng = np.random.default_rng(1)
    planned = plan_request(reliability_repository, "slow", ROWS, rng, binary=True)
    warm = plan_request(reliability_repository, "slow", 1, rng, binary=True)
    in_flight = 8 * workers
    with server_process(
        reliability_repository,
        *("--shutdown-grace", "20", "--drain-seconds", "0", "--workers", str(workers)),
    ) as server:
        warmed, sent, outcomes, client = _send_on_warm_connections(
            server.port, warm, planned, in_flight
        )
        assert warmed.wait(30) and sent.wait(30)
        if workers == 1:  # every request has passed the model lookup
            wait_for_metric(server.url, "bnfold_batch_size_count", 2 * in_flight, 30,
                            model="slow", endpoint="infer")  # fmt: skip
        else:  # a scrape sees one worker's counters: give the requests time to be read
            time.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        _wait_for_log(server, "Shutting down", 10, times=workers)
        # the listening socket is closed: by the one process, or by every worker and the
        # supervisor (which used to keep its copy open, and reset the connection)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/v2/health/live", timeout=5)
        wait_for_exit(server.process, 20)
        exited_after = time.monotonic() - signalled
        client.join(timeout=30)
    print(
        f"FIGURE drain ({workers} worker(s)): {in_flight} requests of {ROWS} rows in flight at "
        f"SIGTERM: {dict(Counter(o.status for o in outcomes))}, exit {exited_after:.2f} s later "
        f"(grace 20 s), status {server.process.returncode}"
    )
    assert_all_exact(outcomes, in_flight, lambda _index: planned)
    assert exited_after < 20


@pytest.mark.parametrize("grace", [2.0])
def test_grace_period_bounds_shutdown(reliability_repository: Path, grace: float) -> None:
    planned = plan_request(
        reliability_repository, "slow", ROWS, np.random.default_rng(2), binary=True
    )
    in_flight = 80  # about 7 s of work on two cores: far more than the grace period
    with server_process(
        reliability_repository, "--shutdown-grace", str(grace), "--drain-seconds", "0"
    ) as server:
        answers, threads = _in_flight(server.url, planned, in_flight)
        wait_for_metric(server.url, "bnfold_batch_size_count", in_flight, 30,
                        model="slow", endpoint="infer")  # fmt: skip
        server.process.send_signal(signal.SIGTERM)
        exited_after = wait_for_exit(server.process, grace + 10)
        for thread in threads:
            thread.join(timeout=30)
        log = server.log_text()
    statuses = Counter(getattr(answer, "status_code", type(answer).__name__) for answer in answers)
    print(
        f"FIGURE grace bound: {in_flight} requests in flight at SIGTERM, grace {grace} s: "
        f"{dict(statuses)}, exit {exited_after:.2f} s later"
    )
    assert exited_after < grace + 2, log  # the grace period, one run, the exit itself
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 200:
            assert not mismatches(planned, answer.content, answer.headers)
        else:
            assert answer.headers["retry-after"] == "1"
            assert "shutting down" in answer.json()["error"]
    assert "Traceback" not in log, log
