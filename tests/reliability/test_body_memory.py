"""A burst of bodies near the body limit on a real `bnfold serve` process: each body's bytes are
held from the decode budget while it is read, so the burst is answered (200) or refused at once
(503 + Retry-After) and the server's peak RSS stays within the budget (service/rest/bodies.py).

The finding: a body was read whole, in pieces and then joined (twice its size),
before any of it was held; 40 clients sending 60 MiB each were all in memory at
once. Now a body that declares its length is held before a byte of it is read.
The load: 32 connections, each sending 15 MiB bodies to a server with a 16 MiB
body limit and the default budget ((concurrent runs + 8) x 16 MiB): three of
four binary tensors, one of four JSON floats (~110 MiB to decode, so it fits
only beside few others). Every answer is 200, exact against the MLP's numpy
reference, or 503 with Retry-After; none is a reset, another status or a hang.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from bnfold.service.protocol import INFERENCE_HEADER
from bnfold.service.settings import MIB, Settings

from .harness import (
    Connection,
    Outcome,
    ServerProcess,
    reset_peak,
    run_load,
    server_process,
    settled_rss,
)
from service_packages import MLP_SEEDS, mlp_reference, mlp_weights

BODY_LIMIT = 16 * MIB
BODY_BYTES = 15 * MIB
#: The server's default budget: the server process computes it the same way on this machine.
BUDGET = Settings(max_body_bytes=BODY_LIMIT).decode_budget
INFER = "/v2/models/mlp/infer"
# What peak RSS holds beside the budget and the responses being written (counted apart):
# the running batch (onnxruntime's hidden layer and output: 1.5x the input, kept in its
# arena), uvicorn's buffer of 64-320 KiB per connection, and the allocator's slack.
PEAK_MARGIN = 96 * MIB
# RSS may stay above where it started once the burst is over (onnxruntime's arena at its
# largest run, allocator arenas), as in test_decode_memory.py.
AFTER_SLACK = 96 * MIB
SETTLE_SECONDS = 20.0
# 32 float32 ulps of the output's scale, as in test_service_http.py.
ULPS = 32


def binary_request(rows: int, seed: int) -> tuple[bytes, dict[str, str], np.ndarray]:
    """A binary tensor body of `rows` x 8 FP32, asking for the output as binary too."""
    batch = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": batch.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    headers = {INFERENCE_HEADER: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + batch.tobytes(), headers, batch


def json_request(rows: int, seed: int) -> tuple[bytes, dict[str, str], np.ndarray]:
    """A JSON body of `rows` x 8 floats as orjson writes them, the output binary."""
    batch = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    tensor = {"name": "input", "shape": [rows, 8], "datatype": "FP32", "data": batch.tolist()}
    body = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return body, {"Content-Type": "application/json"}, batch


def binary_output(outcome: Outcome) -> np.ndarray:
    """The first output of a binary response, as FP32 [rows, 4]."""
    header_length = int(outcome.headers[INFERENCE_HEADER.lower()])
    header = orjson.loads(outcome.body[:header_length])
    output = header["outputs"][0]
    data = np.frombuffer(outcome.body[header_length:], dtype=np.float32)
    assert data.nbytes == output["parameters"]["binary_data_size"]
    return data.reshape(output["shape"])


def assert_exact(served: np.ndarray, batch: np.ndarray) -> None:
    expected = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["eval"]  # `mlp` is version 2
    tolerance = ULPS * float(np.finfo(np.float32).eps) * float(np.abs(expected).max())
    np.testing.assert_allclose(served, expected, rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def body_server(reliability_repository: Path) -> Iterator[ServerProcess]:
    with server_process(reliability_repository, "--max-body-bytes", str(BODY_LIMIT)) as server:
        yield server


def small_requests_are_exact(server: ServerProcess) -> None:
    """After the burst: ordinary requests, each answered exactly."""
    requests = [binary_request(rows, seed=100 + rows) for rows in (1, 7, 64)]

    async def send(connection: Connection, index: int) -> Outcome:
        body, headers, _ = requests[index]
        return await connection.post(index, INFER, body, headers)

    for outcome in run_load(server.port, len(requests), 1, send, deadline=60):
        assert outcome.status == 200, outcome
        assert_exact(binary_output(outcome), requests[outcome.index][2])


@pytest.mark.parametrize(
    ("clients", "rounds"),
    [
        pytest.param(32, 2, id="32-clients"),
        pytest.param(40, 25, id="soak-40-clients-25-rounds", marks=[pytest.mark.soak]),
    ],
)
def test_a_burst_of_large_bodies_is_answered_or_refused_within_the_budget(
    body_server: ServerProcess, clients: int, rounds: int
) -> None:
    assert (Settings(max_body_bytes=BODY_LIMIT).resolved_concurrent_runs + 8) * BODY_LIMIT == BUDGET
    binary = [binary_request(BODY_BYTES // 32 - 16, seed) for seed in range(2)]
    as_json = json_request(BODY_BYTES // 165, seed=2)  # 8 floats of ~20.6 bytes, [ and ] a row
    assert BODY_BYTES - MIB < len(as_json[0]) <= BODY_BYTES, len(as_json[0])
    requests = [*binary, binary[0], as_json]  # three of four binary
    small_requests_are_exact(body_server)  # onnxruntime's arena warmed by ordinary requests
    before = reset_peak(body_server)

    async def send(connection: Connection, index: int) -> Outcome:
        body, headers, _ = requests[index % len(requests)]
        return await connection.post(index, INFER, body, headers)

    started = time.monotonic()
    outcomes = run_load(body_server.port, clients * rounds, clients, send, deadline=600)
    seconds = time.monotonic() - started
    peak = body_server.memory_kib()["VmHWM"] * 1024
    statuses = [outcome.status for outcome in outcomes]
    answered = [outcome for outcome in outcomes if outcome.status == 200]
    json_answered = sum(1 for outcome in answered if outcome.index % len(requests) == 3)
    print(
        f"FIGURE body burst: {clients} clients x {rounds} rounds of {BODY_BYTES // MIB} MiB "
        f"bodies (3/4 binary, 1/4 JSON) in {seconds:.1f} s, budget {BUDGET // MIB} MiB: "
        f"{len(answered)} x 200 ({json_answered} JSON), {statuses.count(503)} x 503, "
        f"other {len(outcomes) - len(answered) - statuses.count(503)}"
    )
    assert len(outcomes) == clients * rounds
    unanswered = [outcome for outcome in outcomes if outcome.status not in (200, 503)]
    assert not unanswered, unanswered[:3]  # no reset (status 0), no other status
    for outcome in outcomes:
        if outcome.status == 503:
            assert outcome.headers["retry-after"] == "1", outcome
            assert b"decode budget" in outcome.body, outcome.body
    assert answered, "the budget holds several of these bodies at once"
    for outcome in answered:
        assert_exact(binary_output(outcome), requests[outcome.index % len(requests)][2])

    # The budget counts bodies and their decoding until the response is built; the
    # responses themselves are then written without it (RELIABILITY.md: Memory budget),
    # so the ceiling adds the bytes of the answers given, as if all were in flight at once.
    responses = sum(len(outcome.body) for outcome in answered)
    ceiling = before + BUDGET + responses + PEAK_MARGIN
    after = settled_rss(body_server, before + AFTER_SLACK, SETTLE_SECONDS)
    print(
        f"FIGURE body burst memory: RSS before {before / MIB:.0f} MiB, peak "
        f"{peak / MIB:.0f} MiB (+{(peak - before) / MIB:.0f}, ceiling +"
        f"{(ceiling - before) // MIB}: budget, {responses // MIB} MiB of responses and "
        f"{PEAK_MARGIN // MIB} MiB), after +{(after - before) / MIB:.0f} MiB; "
        f"{clients} x {BODY_BYTES // MIB} MiB = {clients * BODY_BYTES // MIB} MiB sent at once"
    )
    assert peak <= ceiling, (peak - before) / MIB
    assert after <= before + AFTER_SLACK, (after - before) / MIB
    small_requests_are_exact(body_server)
