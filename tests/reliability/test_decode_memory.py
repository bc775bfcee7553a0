"""What decoding costs a real `bnfold serve` process: compressed and dense bodies stay within
the decode budget, and the memory goes back afterwards (service/rest/bodies.py).

The finding: 64 MiB of JSON zeros gzips to 65 KB. One such request took the
server's RSS from 136 MiB to 1.1 GiB (596 MiB afterwards), four at once to
2.8 GiB. Now a body's decode cost is estimated before it is decoded: this one
is refused (413), and concurrent large bodies share the budget (200 or 503 with
Retry-After). Each test resets the server's peak (VmHWM, through
/proc/PID/clear_refs) before its load, so the peak it reads is its own.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from bnfold.service.settings import MIB

from .harness import (
    Connection,
    Outcome,
    ServerProcess,
    reset_peak,
    run_load,
    server_process,
    settled_rss,
)

BUDGET = 256 * MIB
BODY_LIMIT = 64 * MIB  # the default
# Above the budget: peak RSS also holds what is not decoding (the compressed bodies,
# onnxruntime runs, responses being written, the allocator's slack); measured up to +50 MiB.
PEAK_SLACK = 128 * MIB
# RSS may stay above the starting point by this much once a burst is over (allocator
# arenas, onnxruntime's arena at its largest run); measured +50 to +70 MiB, and +150 MiB
# before the allocator was tuned (bodies.fix_malloc_thresholds, malloc_trim).
AFTER_SLACK = 96 * MIB
SETTLE_SECONDS = 20.0


@pytest.fixture(scope="module")
def memory_server(reliability_repository: Path) -> Iterator[ServerProcess]:
    with server_process(reliability_repository, "--max-decode-bytes", str(BUDGET)) as server:
        yield server


def peak_growth(server: ServerProcess, before: int) -> int:
    return server.memory_kib()["VmHWM"] * 1024 - before


def zeros_bomb() -> bytes:
    """A valid MLP request of JSON zeros just under the 64 MiB body limit, gzipped (~65 KB)."""
    rows = (BODY_LIMIT - 256) // 16
    head = b'{"inputs":[{"name":"input","shape":[%d,8],"datatype":"FP32","data":[' % rows
    body = head + b",".join([b"0"] * (rows * 8)) + b"]}]}"
    assert len(body) <= BODY_LIMIT
    return gzip.compress(body, 9)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_gzip_bomb_of_json_zeros_is_refused_within_the_budget(
    memory_server: ServerProcess, concurrency: int
) -> None:
    bomb = zeros_bomb()
    before = reset_peak(memory_server)

    async def send(connection: Connection, index: int) -> Outcome:
        path = "/v2/models/mlp/compare" if index % 2 else "/v2/models/mlp/infer"
        return await connection.post(index, path, bomb, {"Content-Encoding": "gzip"})

    outcomes = run_load(memory_server.port, concurrency, concurrency, send, deadline=120)
    growth = peak_growth(memory_server, before)
    print(
        f"FIGURE gzip bomb: {concurrency} x {len(bomb) // 1024} KB -> 64 MiB of JSON zeros, "
        f"statuses {sorted(outcome.status for outcome in outcomes)}, peak RSS "
        f"+{growth / MIB:.0f} MiB over {before / MIB:.0f} MiB"
    )
    assert {outcome.status for outcome in outcomes} <= {413, 503}, outcomes
    refused = [outcome for outcome in outcomes if outcome.status == 413]
    assert refused, "at least one bomb is judged on its own cost"
    assert b"decode budget" in refused[0].body and str(BUDGET).encode() in refused[0].body
    # inflating 64 MiB holds twice that (zlib's blocks, then the joined body) from the budget
    assert growth < min(concurrency * 2 * BODY_LIMIT, BUDGET) + PEAK_SLACK, growth


def float_body(rows: int, seed: int) -> bytes:
    batch = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    tensor = {"name": "input", "shape": [rows, 8], "datatype": "FP32", "data": batch.tolist()}
    return gzip.compress(orjson.dumps({"inputs": [tensor]}), 1)


def test_concurrent_large_bodies_share_the_budget_and_give_the_memory_back(
    memory_server: ServerProcess,
) -> None:
    """Six gzip JSON bodies of 100k x 8 floats (16 MiB, about 105 MiB to decode each) at once,
    infer and compare: each is answered or refused with Retry-After, at most two decode at a
    time, and the memory is returned once they are done."""
    rows = 100_000
    requests = [float_body(rows, seed) for seed in range(2)]
    before = reset_peak(memory_server)

    async def send(connection: Connection, index: int) -> Outcome:
        path = "/v2/models/mlp/compare" if index % 2 else "/v2/models/mlp/infer"
        return await connection.post(index, path, requests[index % 2], {"Content-Encoding": "gzip"})

    outcomes = run_load(memory_server.port, 6, 6, send, timeout=60, deadline=120)
    growth = peak_growth(memory_server, before)
    after = settled_rss(memory_server, before + AFTER_SLACK, SETTLE_SECONDS)
    print(
        f"FIGURE concurrent bodies: 6 x 16 MiB of gzipped JSON floats, statuses "
        f"{sorted(outcome.status for outcome in outcomes)}, RSS {before / MIB:.0f} MiB, peak "
        f"+{growth / MIB:.0f} MiB, after +{(after - before) / MIB:.0f} MiB"
    )
    assert {outcome.status for outcome in outcomes} <= {200, 503}, outcomes
    for outcome in outcomes:
        if outcome.status == 503:
            assert outcome.headers["retry-after"] == "1" and b"decode budget" in outcome.body
    answered = [outcome for outcome in outcomes if outcome.status == 200]
    assert answered, "the budget holds two of these at once"
    for outcome in answered:
        if outcome.index % 2 == 0:
            assert orjson.loads(outcome.body)["outputs"][0]["shape"] == [rows, 4]
    assert growth < BUDGET + PEAK_SLACK, growth
    assert after <= before + AFTER_SLACK, (after - before) / MIB
