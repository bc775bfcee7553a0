"""Faults: broken packages, models unloaded and reloaded under load, a poisoned batch.

* Every broken package of the repository (packages.FAULTS: corrupted graph bytes,
  hash mismatch, missing file, absurd or negative declared shape, broken manifest
  or model config) is UNAVAILABLE with its reason, answers 503 with that reason,
  and the other models serve.
* Unload and reload under load: while clients hammer three models, an admin
  reloads one of them (no request to it may fail: the new sessions replace the
  old at once, requests in flight finish on the old ones) and unloads and loads
  another while large requests to it are in flight (those finish with their
  answers; requests arriving while it is unloaded get 503). No request to any
  other model fails.
* A poisoned batch: requests to `poison` are merged by the batcher (it waits up to
  20 ms for company); some carry an index onnxruntime refuses at run time. Only
  those get 422; every other request of the same merged run gets its rows.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from .harness import (
    Connection,
    Outcome,
    ServerProcess,
    metric,
    run_load,
    server_process,
    wait_for_metric,
)
from .packages import FAULTS, SERVING
from .traffic import PlannedRequest, assert_all_exact, mismatches, plan_request
from service_packages import LOOKUP_ROWS, copy_repository, lookup_table
from service_server import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_broken_packages_are_isolated_with_their_reason(client: httpx.Client) -> None:
    index = {
        (entry["name"], entry["version"]): entry
        for entry in client.post("/v2/repository/index", json={}).json()
    }
    for name, reason in FAULTS.items():
        entry = index[(name, "1")]
        assert entry["state"] == "UNAVAILABLE", entry
        assert reason in entry["reason"], entry
        row = {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}
        response = client.post(f"/v2/models/{name}/infer", json={"inputs": [row]})
        assert response.status_code == 503, response.text
        assert reason in response.json()["error"]
        assert client.get(f"/v2/models/{name}/ready").status_code == 503
    for name in SERVING:
        assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert client.get("/v2/health/ready").status_code == 200


# ---------------------------------------------------------------- poisoned batches

POISON_REQUESTS = 400


def test_an_inference_error_does_not_poison_its_batch(load_server: ServerProcess) -> None:
    rng = np.random.default_rng(9)
    requests = []
    for index in range(POISON_REQUESTS):
        rows = rng.integers(0, LOOKUP_ROWS, int(rng.integers(1, 5))).astype(np.int64)
        if index % 5 == 2:
            rows[-1] = LOOKUP_ROWS + index  # out of the table: onnxruntime fails the run
        body = {"inputs": [{"name": "index", "shape": [len(rows)], "datatype": "INT64",
                            "data": rows.tolist()}]}  # fmt: skip
        requests.append((rows, orjson.dumps(body)))
    runs_before = _runs(load_server)

    async def send(connection: Connection, index: int) -> Outcome:
        return await connection.post(index, "/v2/models/poison/infer", requests[index][1])

    outcomes = run_load(load_server.port, POISON_REQUESTS, 64, send)
    runs, merged = (
        after - before for after, before in zip(_runs(load_server), runs_before, strict=True)
    )
    print(
        f"FIGURE poison: {POISON_REQUESTS} requests, every 5th failing, over {runs} batcher "
        f"runs, {merged} of them merging several requests"
    )
    assert merged > 0, "the batcher merged nothing: the test proves nothing"
    for outcome in outcomes:
        rows = requests[outcome.index][0]
        if outcome.index % 5 == 2:
            assert outcome.status == 422, outcome
            assert b"onnxruntime could not run poison on this input" in outcome.body
            assert b"indices element out of data bounds" in outcome.body
        else:
            assert outcome.status == 200, outcome
            served = np.asarray(orjson.loads(outcome.body)["outputs"][0]["data"], np.float32)
            assert np.array_equal(served, lookup_table()[rows].reshape(-1))


def _runs(server: ServerProcess) -> tuple[float, float]:
    """(batcher runs of `poison`, those that merged more than one request), from /metrics."""
    count = metric(server.url, "bnfold_run_requests_count", model="poison")
    alone = metric(server.url, "bnfold_run_requests_bucket", model="poison", le="1.0")
    return count, count - alone


# ---------------------------------------------------------------- unload and reload

STEADY_MODELS = [("mlp", 3), ("dtypes", 2), ("pixels", 4)]
IN_FLIGHT_ROWS = 1024  # about 170 ms of the slow model: long enough to be caught in flight


@pytest.fixture()
def admin_server(reliability_repository: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    repository = copy_repository(reliability_repository, tmp_path / "repository")
    with server_process(repository, env={"BNFOLD_ADMIN_TOKEN": ADMIN_TOKEN}) as server:
        yield server


@pytest.mark.parametrize(
    "cycles",
    [pytest.param(6, id="6-cycles"), pytest.param(200, id="soak-200-cycles", marks=[pytest.mark.soak, pytest.mark.timeout(1800)])],
)  # fmt: skip
def test_unload_and_reload_under_load(
    admin_server: ServerProcess, reliability_repository: Path, cycles: int
) -> None:
    rng = np.random.default_rng(17)
    steady = [
        plan_request(reliability_repository, model, rows, rng, binary=bool(index % 2))
        for index, (model, rows) in enumerate(STEADY_MODELS * 8)
    ]
    long_running = plan_request(reliability_repository, "slow", IN_FLIGHT_ROWS, rng, binary=True)
    stop = threading.Event()
    steady_outcomes: list[Outcome] = []

    def hammer() -> None:
        """Steady traffic to mlp, dtypes and pixels until `stop`, 16 connections."""

        async def worker(offset: int) -> None:
            connection = Connection(admin_server.port, timeout=30)
            index = offset
            while not stop.is_set():
                planned = steady[index % len(steady)]
                steady_outcomes.append(
                    await connection.post(index, planned.path, planned.content, planned.headers)
                )
                index += 16
            await connection.close()

        async def main() -> None:
            await asyncio.gather(*(worker(offset) for offset in range(16)))

        asyncio.run(main())

    load = threading.Thread(target=hammer, daemon=True)
    load.start()
    in_flight: list[tuple[str, httpx.Response]] = []
    accepted = 0.0  # slow requests that reached the batcher so far
    with httpx.Client(base_url=admin_server.url, timeout=60) as admin:
        try:
            for _ in range(cycles):
                # reload pixels, which the steady traffic is using: nothing may fail
                assert (
                    admin.post("/v2/repository/models/pixels/load", headers=ADMIN).status_code
                    == 200
                )
                # unload slow with requests in flight, then load it back
                threads = [
                    threading.Thread(target=_post_into, args=(admin_server.url, long_running, in_flight, "before"))
                    for _ in range(3)
                ]  # fmt: skip
                for thread in threads:
                    thread.start()
                # in flight: past the model lookup, holding the sessions
                wait_for_metric(admin_server.url, "bnfold_batch_size_count", accepted + 3, 30,
                                model="slow", endpoint="infer")  # fmt: skip
                accepted += 4
                assert (
                    admin.post("/v2/repository/models/slow/unload", headers=ADMIN).status_code
                    == 200
                )
                response = admin.post(long_running.path, content=long_running.content,
                                      headers=long_running.headers)  # fmt: skip
                assert response.status_code == 503 and b"unloaded" in response.content
                assert (
                    admin.post("/v2/repository/models/slow/load", headers=ADMIN).status_code == 200
                )
                for thread in threads:
                    thread.join(timeout=60)
                _post_into(admin_server.url, long_running, in_flight, "after")
        finally:
            stop.set()
            load.join(timeout=60)
    print(
        f"FIGURE unload/reload: {cycles} cycles (reload pixels, unload + load slow with 3 "
        f"requests in flight); steady traffic {len(steady_outcomes)} requests "
        f"{dict(Counter(o.status for o in steady_outcomes))}; "
        f"in-flight slow requests {Counter(r.status_code for _, r in in_flight)}"
    )
    assert_all_exact(
        steady_outcomes, len(steady_outcomes), lambda index: steady[index % len(steady)]
    )
    assert len(in_flight) == 4 * cycles
    for when, response in in_flight:
        assert response.status_code == 200, (when, response.text)
        assert not mismatches(long_running, response.content, response.headers)


def _post_into(
    url: str, planned: PlannedRequest, into: list[tuple[str, httpx.Response]], label: str
) -> None:
    response = httpx.post(
        url + planned.path, content=planned.content, headers=planned.headers, timeout=60
    )
    into.append((label, response))
