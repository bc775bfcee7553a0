"""Load against a `bnfold serve` process: mixed concurrent traffic, compare beside infer,
and overload. Nothing accepted may be lost and every answer must be the request's own.

* Mixed: thousands of requests at once over five models, two versions, batch
  sizes 1 to 16, JSON and binary; the dynamic batcher merges them. Every response
  must be bit-identical to onnxruntime run on that request's input alone.
* Compare isolation: compare (train-mode graph, batch statistics) interleaved with
  infer under load; every infer answer stays bit-identical to its answer on an idle
  server, and every compare answer to its own idle answer.
* Overload: more clients than the queue admits. The surplus gets 503 with
  Retry-After at once (no waiting in line), the server's memory stays bounded,
  and once the clients stop it serves normally again.

The figures (throughput, latency percentiles, resident memory) are printed;
RELIABILITY.md records them. The soak variants (`-m soak`, make test-soak) run the
same cases for minutes.
"""

from __future__ import annotations

import asyncio
import threading
import time
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
    percentile,
    run_for,
    run_load,
    server_process,
)
from .traffic import (
    PlannedRequest,
    assert_all_exact,
    body,
    mismatches,
    plan_request,
    random_inputs,
    reference_session,
)

MIXED_MODELS = [("mlp", None), ("mlp", 1), ("mlp", 2), ("pixels", None), ("dtypes", None),
                ("lookup", None), ("slow", None)]  # fmt: skip
BATCH_SIZES = [1, 1, 2, 3, 4, 8, 16]


def mixed_plan(repository: Path, count: int, seed: int) -> list[PlannedRequest]:
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(count):
        model, version = MIXED_MODELS[rng.integers(len(MIXED_MODELS))]
        rows = int(rng.choice(BATCH_SIZES))
        binary = bool(rng.integers(2))
        plan.append(plan_request(repository, model, rows, rng, binary=binary, version=version))
    return plan


def report(
    label: str, outcomes: list[Outcome], seconds: float, server: ServerProcess | None = None
) -> None:
    latencies = [outcome.seconds * 1000 for outcome in outcomes]
    line = (
        f"FIGURE {label}: {len(outcomes)} requests in {seconds:.1f} s "
        f"({len(outcomes) / seconds:.0f}/s), latency p50 {percentile(latencies, 0.5):.1f} ms, "
        f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms"
    )
    if server is not None:
        memory = server.memory_kib()
        line += f", server RSS {memory['VmRSS'] / 1024:.0f} MiB (peak {memory['VmHWM'] / 1024:.0f})"
    print(line)


def test_rows_are_computed_independently_of_the_batch(reliability_repository: Path) -> None:
    """What makes bit-identical comparisons fair: a row's outputs do not depend on its batch."""
    rng = np.random.default_rng(1)
    for model in ("mlp", "pixels", "slow", "dtypes", "lookup"):
        version = 2 if model == "mlp" else 1
        session = reference_session(reliability_repository / model / str(version) / "model.onnx")
        batch = random_inputs(model, 48, rng)
        whole = session.run(None, batch)
        for size in (1, 5, 16):
            parts = [
                session.run(
                    None, {name: array[start : start + size] for name, array in batch.items()}
                )
                for start in range(0, 48, size)
            ]
            for position, output in enumerate(whole):
                joined = np.concatenate([part[position] for part in parts])
                assert np.array_equal(joined, output), (model, size)


@pytest.mark.parametrize(
    ("count", "concurrency"),
    [
        pytest.param(2000, 32, id="2000x32"),
        pytest.param(
            60_000, 128, id="soak-60000x128", marks=[pytest.mark.soak, pytest.mark.timeout(1800)]
        ),
    ],
)
def test_mixed_concurrent_requests_get_their_own_answers(
    load_server: ServerProcess, reliability_repository: Path, count: int, concurrency: int
) -> None:
    plan = mixed_plan(reliability_repository, count, seed=count)

    async def send(connection: Connection, index: int) -> Outcome:
        request = plan[index]
        return await connection.post(index, request.path, request.content, request.headers)

    runs_before = merged_runs(load_server)
    started = time.perf_counter()
    outcomes = run_load(load_server.port, count, concurrency, send, deadline=max(120, count / 50))
    report(f"mixed {count}x{concurrency}", outcomes, time.perf_counter() - started, load_server)
    assert_all_exact(outcomes, len(plan), lambda index: plan[index])
    runs, merged = (
        after - before for after, before in zip(merged_runs(load_server), runs_before, strict=True)
    )
    print(
        f"FIGURE mixed {count}x{concurrency}: {runs:.0f} runs, {merged:.0f} merging several requests"
    )
    assert merged > 0, "the batcher merged nothing: the test did not exercise it"


def merged_runs(server: ServerProcess) -> tuple[float, float]:
    """(model.onnx runs, runs that merged several requests) over the mixed test's models."""
    runs = merged = 0.0
    for model in {model for model, _ in MIXED_MODELS}:
        count = metric(server.url, "bnfold_run_requests_count", model=model)
        runs += count
        merged += count - metric(server.url, "bnfold_run_requests_bucket", model=model, le="1.0")
    return runs, merged


# ---------------------------------------------------------------- compare isolation


@pytest.mark.parametrize(
    "count",
    [
        pytest.param(1200, id="1200"),
        pytest.param(30_000, id="soak-30000", marks=[pytest.mark.soak, pytest.mark.timeout(1800)]),
    ],
)
def test_compare_beside_infer_changes_no_infer_bit(load_server: ServerProcess, count: int) -> None:
    rng = np.random.default_rng(7)
    infers = [
        body(random_inputs(model, rows, rng), binary=True)
        for model, rows in [("mlp", 4), ("mlp", 1), ("pixels", 3), ("pixels", 8)] * 4
    ]
    infer_paths = ["/v2/models/mlp/infer", "/v2/models/mlp/infer", "/v2/models/pixels/infer",
                   "/v2/models/pixels/infer"] * 4  # fmt: skip
    # compare batches far from the running statistics: large drift, both graphs busy
    compares = [
        body({"input": (rng.normal(2.0, 3.0, (rows, 8))).astype(np.float32)}, binary=False,
             extra={"return_outputs": True})
        for rows in (2, 16, 64)
    ] + [
        body({"image": rng.normal(-1.0, 2.0, (rows, 2, 3, 3)).astype(np.float32)}, binary=False)
        for rows in (1, 8)
    ]  # fmt: skip
    compare_paths = ["/v2/models/mlp/compare"] * 3 + ["/v2/models/pixels/compare"] * 2
    with httpx.Client(base_url=load_server.url, timeout=30) as client:
        idle_infer = [
            client.post(path, content=content, headers=headers).content
            for path, (content, headers) in zip(infer_paths, infers, strict=True)
        ]
        idle_compare = [
            client.post(path, content=content, headers=headers).content
            for path, (content, headers) in zip(compare_paths, compares, strict=True)
        ]
    assert all(orjson.loads(report_)["batch_size"] for report_ in idle_compare)

    async def send(connection: Connection, index: int) -> Outcome:
        position = index // 2
        if index % 2:
            content, headers = compares[position % len(compares)]
            return await connection.post(
                index, compare_paths[position % len(compares)], content, headers
            )
        content, headers = infers[position % len(infers)]
        return await connection.post(index, infer_paths[position % len(infers)], content, headers)

    started = time.perf_counter()
    outcomes = run_load(load_server.port, count, 32, send, deadline=max(120, count / 50))
    report(f"compare+infer {count}x32", outcomes, time.perf_counter() - started, load_server)
    assert Counter(outcome.status for outcome in outcomes) == {200: count}
    for outcome in outcomes:
        if outcome.index % 2:
            assert outcome.body == idle_compare[outcome.index // 2 % len(compares)]
        else:
            assert outcome.body == idle_infer[outcome.index // 2 % len(infers)], outcome.index


# ---------------------------------------------------------------- overload

QUEUE = 8
OVERLOAD_ROWS = 128  # about 20 ms of the slow model on one core, a 128 KiB body


@pytest.fixture(scope="module")
def overload_server(reliability_repository: Path) -> Iterator[ServerProcess]:
    with server_process(
        reliability_repository,
        *("--max-queue-size", str(QUEUE), "--max-batch-size", "4", "--log-format", "json"),
    ) as server:
        yield server


def logged_latencies_ms(
    server: ServerProcess, since: int, path: str
) -> dict[tuple[int, bool], list[float]]:
    """By (status, whether the body was read), the latencies the server logged for `path` in
    its access lines after its first `since` log lines: from the request's head to its
    answer, the wait for the event loop before the head was parsed (which the clients'
    clocks include) left out. Read once the access log has written what it had queued (it
    writes every 50 ms and drops what exceeds its queue, so: until no line comes for 0.5 s);
    each line is parsed once (a soak run logs about a million)."""
    latencies: dict[tuple[int, bool], list[float]] = {}
    read, quiet_since = since, time.monotonic()
    while time.monotonic() - quiet_since < 0.5:
        time.sleep(0.05)
        lines = server.log[read:]
        if lines:
            read += len(lines)
            quiet_since = time.monotonic()
        for line in lines:
            if '"latency_ms"' not in line:
                continue
            fields = orjson.loads(line)
            if fields["path"] == path:
                key = (fields["status"], fields["bytes_in"] > 0)
                latencies.setdefault(key, []).append(fields["latency_ms"])
    return latencies


class MemorySampler:
    """The server's resident memory every 20 ms while a load runs."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(self.server.memory_kib()["VmRSS"])

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mib(self) -> float:
        return max(self.samples) / 1024


def sequential(
    server: ServerProcess, path: str, planned: PlannedRequest, count: int
) -> tuple[list[float], httpx.Response]:
    """Latencies of `count` identical requests sent one after another, and their one answer."""
    seconds, responses = [], []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.post(path, content=planned.content, headers=planned.headers)
            seconds.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            responses.append(response)
    assert len({response.content for response in responses}) == 1, "different answers"
    return seconds, responses[0]


OVERLOADS = [
    pytest.param("infer", 256, False, 5.0, id="infer-256-clients-retrying-at-once"),
    pytest.param("infer", 256, True, 5.0, id="infer-256-clients-honouring-retry-after"),
    pytest.param("compare", 256, False, 5.0, id="compare-256-clients-retrying-at-once"),
    pytest.param(
        "infer", 1024, False, 180.0, id="soak-infer-1024-clients-180s",
        marks=[pytest.mark.soak, pytest.mark.timeout(1800)],
    ),
    pytest.param(
        "compare", 1024, True, 180.0, id="soak-compare-1024-clients-180s",
        marks=[pytest.mark.soak, pytest.mark.timeout(1800)],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "clients", "polite", "seconds"), OVERLOADS)
def test_overload_is_refused_fast_and_recovers(
    overload_server: ServerProcess,
    reliability_repository: Path,
    endpoint: str,
    clients: int,
    polite: bool,
    seconds: float,
) -> None:
    """`clients` connections sending one request again and again for `seconds`: a polite
    client waits Retry-After after a 503, an impolite one sends again at once."""
    planned = plan_request(
        reliability_repository, "slow", OVERLOAD_ROWS, np.random.default_rng(3), binary=True
    )
    path = planned.path.removesuffix("infer") + endpoint
    idle, idle_answer = sequential(overload_server, path, planned, 20)
    if endpoint == "infer":
        assert not mismatches(planned, idle_answer.content, idle_answer.headers)
    answer = idle_answer.content
    before = overload_server.memory_kib()

    async def send(connection: Connection, index: int) -> Outcome:
        outcome = await connection.post(index, path, planned.content, planned.headers)
        if polite and outcome.status == 503:
            await asyncio.sleep(float(outcome.headers["retry-after"]))
        return outcome

    time.sleep(0.1)  # the idle requests' access lines are written (every 50 ms)
    logged_before = len(overload_server.log)
    with MemorySampler(overload_server) as memory:
        started = time.perf_counter()
        outcomes = run_for(overload_server.port, clients, seconds, send)
        elapsed = time.perf_counter() - started
    statuses = Counter(outcome.status for outcome in outcomes)
    assert set(statuses) == {200, 503}, statuses
    served = [outcome for outcome in outcomes if outcome.status == 200]
    refused = [outcome for outcome in outcomes if outcome.status == 503]
    for outcome in refused:
        assert outcome.headers["retry-after"] == "1"
        assert b"(max_queue_size); retry later" in outcome.body
    wrong = [outcome.index for outcome in served if outcome.body != answer]
    assert not wrong, wrong[:10]
    refused_ms = [outcome.seconds * 1000 for outcome in refused]
    served_ms = [outcome.seconds * 1000 for outcome in served]
    logged = logged_latencies_ms(overload_server, logged_before, path)
    refused_early_ms = logged.get((503, False), [])  # refused before the body was read
    refused_queued_ms = logged.get((503, True), [])  # admitted, refused when queued
    served_inside_ms = logged.get((200, True), [])
    print(
        f"FIGURE overload {endpoint}, {clients} {'polite' if polite else 'impolite'} clients for "
        f"{elapsed:.1f} s, queue {QUEUE}: {len(served)} served ({len(served) / elapsed:.0f}/s), "
        f"{len(refused)} refused with 503; refusal p50 {percentile(refused_ms, 0.5):.1f} ms, "
        f"p99 {percentile(refused_ms, 0.99):.1f} ms; served p50 "
        f"{percentile(served_ms, 0.5):.0f} ms, p99 {percentile(served_ms, 0.99):.0f} ms (idle "
        f"{1000 * percentile(idle, 0.5):.0f} ms); server RSS {before['VmRSS'] / 1024:.0f} MiB "
        f"before, peak {memory.peak_mib:.0f} MiB; inside the server: {len(refused_early_ms)} "
        f"refused before the body was read, p50 {percentile(refused_early_ms, 0.5):.2f} ms, "
        f"p99 {percentile(refused_early_ms, 0.99):.2f} ms; {len(refused_queued_ms)} refused "
        f"when queued, p50 {percentile(refused_queued_ms, 0.5):.0f} ms; served p50 "
        f"{percentile(served_inside_ms, 0.5):.0f} ms"
    )
    # refused at once: a refusal waits for no run, however long the queue is. Timed inside
    # the server (the access log's latency, from the request's head to its answer), since
    # a client's clock adds the event loop's backlog (a burst of 256 heads parsed one after
    # another) and the load generator on the same two cores, which made a client-side
    # comparison flaky. A request admitted while the queue had room and refused when it was
    # queued has read its body first (in a burst, tens of ms), but waited for no run either.
    assert len(refused_early_ms) > len(refused) / 2
    idle_run_ms = 1000 * min(idle)  # one request alone, its run included
    assert percentile(refused_early_ms, 0.5) < idle_run_ms / 4
    # the slowest refusals waited for the GIL or the CPU (both cores are busy), which
    # does not grow with the queue; a served request's wait does
    slowest_allowed = max(idle_run_ms, percentile(served_inside_ms, 0.5) / 4)
    assert percentile(refused_early_ms, 0.99) < slowest_allowed
    # bounded by the queue (QUEUE requests of 128 KiB, the runs' activations: 64 MiB) and
    # each open connection's read buffers (measured: about 225 KiB a connection)
    assert memory.peak_mib - before["VmRSS"] / 1024 < 64 + clients / 4

    # recovery: the same request, one at a time, is served as fast as before the storm
    after, again = sequential(overload_server, path, planned, 20)
    assert again.content == answer
    assert percentile(after, 0.5) < 3 * percentile(idle, 0.5) + 0.05
