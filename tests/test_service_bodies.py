"""Request bodies (service/rest/bodies.py): compressed streams must end where they say they end, and
decoding stays within the memory budget, on a real server.

What decoding costs in resident memory is measured on a `bnfold serve` process in
tests/reliability/test_decode_memory.py; here the rules: which bodies are refused
with which status, that the budget is shared and always given back, and the
estimate's and settings' arithmetic.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from bnfold.cli import app as cli_app
from bnfold.service import serve_cli
from bnfold.service.errors import DecodeBudgetFull, PayloadTooLarge
from bnfold.service.protocol import INFERENCE_HEADER, ErrorResponse
from bnfold.service.rest import bodies
from bnfold.service.rest.bodies import OFF_LOOP_BYTES, DecodeBudget, decode_cost
from bnfold.service.settings import MIB, Settings

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights, write_mlp
from service_server import RunningServer, running_server

INFER = "/v2/models/mlp/infer"
COMPARE = "/v2/models/mlp/compare"
GZIP = {"Content-Encoding": "gzip"}
DEFLATE = {"Content-Encoding": "deflate"}
DEADLINE_SECONDS = 30.0


def mlp_body(rows: int, seed: int = 0) -> bytes:
    batch = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    tensor = {"name": "input", "shape": [rows, 8], "datatype": "FP32", "data": batch.tolist()}
    return orjson.dumps({"inputs": [tensor]})


def zeros_body(rows: int) -> bytes:
    """A valid MLP request of `rows` x 8 zeros: two bytes of JSON per value, the densest."""
    data = b",".join([b"0"] * (rows * 8))
    return b'{"inputs":[{"name":"input","shape":[%d,8],"datatype":"FP32","data":[%s]}]}' % (
        rows,
        data,
    )


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return ErrorResponse.model_validate(response.json()).error


@pytest.fixture(scope="module")
def client(service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http


# ---------------------------------------------------------------- compressed streams

PLAIN = mlp_body(5)
MEMBER = gzip.compress(PLAIN)


@pytest.mark.parametrize("endpoint", [INFER, COMPARE])
@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (MEMBER[:-8], GZIP, "incomplete gzip"),  # no CRC-32 and size trailer
        (MEMBER[:-3], GZIP, "incomplete gzip"),  # half a trailer
        (MEMBER + b"junk", GZIP, "4 bytes of trailing data after the end of its gzip stream"),
        (MEMBER + b"\0" * 8, GZIP, "8 bytes of trailing data"),
        (MEMBER + b"\x1f\x8b" + bytes(range(40)), GZIP, "not valid gzip"),  # a garbage member
        (MEMBER + b"\x1f\x8b", GZIP, "incomplete gzip"),  # a member that is only its magic
        (zlib.compress(PLAIN) + b"x", DEFLATE, "1 byte of trailing data after the end of its "),
        (zlib.compress(PLAIN) * 2, DEFLATE, "trailing data after the end of its deflate stream"),
        (zlib.compress(PLAIN)[:-4], DEFLATE, "incomplete deflate"),  # no Adler-32
        (gzip.compress(b"{}") * 65, GZIP, "more than 64 gzip members"),
    ],
    ids=[
        "gzip without trailer",
        "gzip half trailer",
        "gzip trailing junk",
        "gzip zero padding",
        "gzip garbage member",
        "gzip magic alone",
        "deflate trailing byte",
        "deflate twice",
        "deflate truncated",
        "65 gzip members",
    ],
)
def test_streams_that_do_not_end_properly_are_400(
    client: httpx.Client, endpoint: str, body: bytes, headers: dict[str, str], message: str
) -> None:
    assert message in error(client.post(endpoint, content=body, headers=headers), 400)


@pytest.mark.parametrize("endpoint", [INFER, COMPARE])
def test_concatenated_gzip_members_are_one_body(client: httpx.Client, endpoint: str) -> None:
    """RFC 1952: a gzip file may be several members; each is inflated in turn."""
    split = len(PLAIN) // 3
    members = gzip.compress(PLAIN[:split]) + gzip.compress(PLAIN[split:])
    answer = client.post(endpoint, content=members, headers=GZIP)
    assert answer.status_code == 200, answer.text
    assert answer.json() == client.post(endpoint, content=PLAIN).json()
    if endpoint == INFER:
        batch = np.asarray(orjson.loads(PLAIN)["inputs"][0]["data"], dtype=np.float32)
        expected = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["eval"]
        served = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(5, 4)
        # 32 float32 ulps of the output's scale, as in test_service_http.py
        tolerance = 32 * float(np.finfo(np.float32).eps) * float(np.abs(expected).max())
        np.testing.assert_allclose(served, expected, rtol=0, atol=tolerance)


def test_deflate_and_empty_bodies_still_read(client: httpx.Client) -> None:
    assert client.post(INFER, content=zlib.compress(PLAIN), headers=DEFLATE).status_code == 200
    empty = client.post("/v2/repository/index", content=b"", headers=GZIP)
    assert empty.status_code == 200, empty.text


# ---------------------------------------------------------------- the decode budget


@pytest.fixture(scope="module")
def dense_service(service_repository: Path) -> Iterator[RunningServer]:
    """A 1 MiB body limit and one run: the default decode budget is 9 MiB."""
    settings = Settings(
        repository=service_repository, device="cpu", max_body_bytes=MIB, concurrent_runs=1
    )
    with running_server(settings) as server:
        yield server


def test_a_dense_body_over_the_budget_is_413_before_it_is_decoded(
    dense_service: RunningServer,
) -> None:
    """1 MiB of JSON zeros is under the body limit but would take ~50 MiB to decode."""
    zeros = zeros_body(60_000)
    assert len(zeros) < MIB
    budget = dense_service.app.state.settings.decode_budget
    assert budget == 9 * MIB
    with httpx.Client(base_url=dense_service.url, timeout=30) as http:
        for endpoint in (INFER, COMPARE):
            for content, headers in ((zeros, {}), (gzip.compress(zeros), GZIP)):
                message = error(http.post(endpoint, content=content, headers=headers), 413)
                assert f"about {decode_cost(zeros, None)} bytes of memory" in message
                assert f"{budget}-byte decode budget" in message
        index = b'{"ready": true, "padding": [' + b",".join([b"0"] * 400_000) + b"]}"
        assert "decode budget" in error(http.post("/v2/repository/index", content=index), 413)
        assert http.post(INFER, content=mlp_body(1000)).status_code == 200
    assert dense_service.app.state.decode_budget.in_flight == 0


# A request that waits a second in the batcher for company, holding its share; BESIDE alone
# fits the budget, not both: it is refused at once while FIRST is in flight.
FIRST, BESIDE = mlp_body(16, seed=1), mlp_body(16, seed=2)
TIGHT_BUDGET = decode_cost(FIRST, None) + decode_cost(BESIDE, None) - 1


@pytest.fixture(scope="module")
def tight_service(service_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        repository=service_repository,
        device="cpu",
        max_decode_bytes=TIGHT_BUDGET,
        max_queue_delay_us=1_000_000,
    )
    with running_server(settings) as server:
        yield server


def _hold_first(server: RunningServer) -> tuple[threading.Thread, list[httpx.Response]]:
    """FIRST in a thread; returns once the server holds its share."""
    answers: list[httpx.Response] = []

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answers.append(http.post(INFER, content=FIRST))

    sender = threading.Thread(target=send, name="first-request")
    sender.start()
    budget: DecodeBudget = server.app.state.decode_budget
    deadline = time.monotonic() + DEADLINE_SECONDS
    while budget.in_flight < decode_cost(FIRST, None) and sender.is_alive():
        assert time.monotonic() < deadline, "the first request never held its share"
        time.sleep(0.001)
    return sender, answers


@pytest.mark.parametrize("endpoint", [INFER, COMPARE])
def test_a_request_that_does_not_fit_beside_others_is_503_at_once(
    tight_service: RunningServer, endpoint: str
) -> None:
    refused = None
    with httpx.Client(base_url=tight_service.url, timeout=30) as http:
        for _ in range(3):  # the first request waits 1 s in the batcher; retried if it was quicker
            sender, answers = _hold_first(tight_service)
            beside = http.post(endpoint, content=BESIDE)
            sender.join(DEADLINE_SECONDS)
            assert answers and answers[0].status_code == 200, answers
            if beside.status_code != 200:
                refused = beside
                break
        assert refused is not None, "the first request was never in flight long enough"
        assert "retry later" in error(refused, 503)
        assert refused.headers["retry-after"] == "1"
        assert "decode budget" in refused.json()["error"]
        assert http.post(endpoint, content=BESIDE).status_code == 200  # alone, it fits
    assert tight_service.app.state.decode_budget.in_flight == 0


def test_every_outcome_gives_its_share_back(tight_service: RunningServer) -> None:
    """Decode errors (400), misfits (422), refusals (413, 415): the budget is whole after each."""
    budget: DecodeBudget = tight_service.app.state.decode_budget
    misfit = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [0] * 6}]}
    )
    cases = [
        (INFER, b'{"inputs": [' + b"0," * 200, {}, 400),
        (INFER, misfit, {}, 422),
        (COMPARE, misfit, {}, 422),
        (INFER, zeros_body(200), {}, 413),
        (INFER, gzip.compress(zeros_body(200)), GZIP, 413),
        (INFER, MEMBER[:-8], GZIP, 400),
        (INFER, PLAIN, {"Content-Encoding": "br"}, 415),
        (INFER, orjson.dumps({"inputs": []}), {INFERENCE_HEADER: "2"}, 400),
    ]
    with httpx.Client(base_url=tight_service.url, timeout=30) as http:
        for endpoint, content, headers, status in cases:
            error(http.post(endpoint, content=content, headers=headers), status)
            assert budget.in_flight == 0, (endpoint, status)


def test_budget_shares_add_up_and_refuse_with_the_right_status() -> None:
    budget = DecodeBudget(1000, malloc_trim=None)
    with budget.share() as first:
        first.hold(600, "first")
        with budget.share() as second, pytest.raises(DecodeBudgetFull) as full:
            second.hold(500, "second")
        assert full.value.status_code == 503 and full.value.headers == {"Retry-After": "1"}
        assert "hold 600 of the server's 1000-byte decode budget" in full.value.message
        with pytest.raises(PayloadTooLarge, match="about 1001 bytes"), budget.share() as alone:
            alone.hold(1001, "alone")
        first.hold(100, "first, decoded")  # a share shrinks as well as grows
        with budget.share() as third:
            third.hold(900, "third")
            assert budget.in_flight == 1000
        with pytest.raises(RuntimeError), budget.share() as failing:
            failing.hold(300, "failing")
            raise RuntimeError("the request failed after holding its share")
        assert budget.in_flight == 100
    assert budget.in_flight == 0


def test_one_trim_after_a_burst_of_large_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """malloc_trim runs once the large shares are gone, not once each, and never for small ones."""
    monkeypatch.setattr(bodies, "TRIM_DELAY_SECONDS", 0.01)
    trims: list[int] = []
    budget = DecodeBudget(10**12, malloc_trim=lambda pad: trims.append(pad) or 1)
    large = bodies.TRIM_AFTER_BYTES

    async def burst() -> None:
        with budget.share() as last:
            last.hold(large, "last")
            for _ in range(3):
                with budget.share() as share:
                    share.hold(large, "large")
            await asyncio.sleep(0.05)  # a trim due now finds a large decode in flight: skipped
        with budget.share() as small:
            small.hold(large - 1, "small")
        for _ in range(int(DEADLINE_SECONDS / 0.01)):
            if trims:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)

    asyncio.run(burst())
    assert trims == [0]


def test_the_estimate_counts_json_items_and_binary_bytes_once() -> None:
    text = orjson.dumps({"inputs": [{"name": "x", "shape": [3], "data": [1, 2, 3]}]})
    items = 1 + text.count(b",") + text.count(b":") + text.count(b"[")
    assert decode_cost(text, None) == 2 * len(text) + 96 * items + 256 * text.count(b"{")
    header = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [65536], "datatype": "UINT8", "parameters": {}}]}
    )
    commas = b"," * 65536  # raw bytes that happen to be commas are no JSON items
    binary = decode_cost(header + commas, len(header))
    assert binary == decode_cost(header, None) + len(commas)


@pytest.mark.parametrize("size", [OFF_LOOP_BYTES - 7, OFF_LOOP_BYTES + 7])
def test_the_estimate_is_the_same_counted_either_way(size: int) -> None:
    """Up to OFF_LOOP_BYTES of JSON text the marks are counted in one pass, above in place
    per mark: the same estimate, from a bytes body and a bytearray alike."""
    unit = b'{"a": [0.5, 1], "b": [[2]]},'
    text = (unit * (size // len(unit) + 1))[:size]
    items = 1 + text.count(b",") + text.count(b":") + text.count(b"[")
    expected = 2 * len(text) + 96 * items + 256 * text.count(b"{")
    assert decode_cost(text, None) == expected
    assert decode_cost(bytearray(text), None) == expected
    tail = b"[,:{" * 8  # binary bytes after the header count once, as bytes
    assert decode_cost(text + tail, len(text)) == expected + len(tail)


# ---------------------------------------------------------------- reading within the budget

READ_BUDGET = 8 * MIB
HELD_BODY = 6 * MIB  # fits the budget alone, not beside another one


def binary_body(size: int, seed: int = 0) -> tuple[bytes, dict[str, str], np.ndarray]:
    """A binary MLP request of about `size` bytes and its batch."""
    rows = size // 32
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
            ]
        }
    )
    return header + batch.tobytes(), {INFERENCE_HEADER: str(len(header))}, batch


def request_head(body: bytes, headers: dict[str, str], *extra: str) -> bytes:
    lines = [f"POST {INFER} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()] + list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (the service always sends Content-Length) from a blocking socket."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a response: {received!r}"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }
    while len(rest) < int(headers["content-length"]):
        chunk = connection.recv(65536)
        assert chunk, "the connection closed inside a response"
        rest += chunk
    return int(status_line.split()[1]), headers, rest


@pytest.fixture(scope="module")
def read_service(service_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(
        repository=service_repository,
        device="cpu",
        max_body_bytes=16 * MIB,
        max_decode_bytes=READ_BUDGET,
    )
    with running_server(settings) as server:
        yield server


def wait_for_in_flight(server: RunningServer, predicate: Callable[[int], bool]) -> None:
    budget: DecodeBudget = server.app.state.decode_budget
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not predicate(budget.in_flight):
        assert time.monotonic() < deadline, f"the budget stayed at {budget.in_flight}"
        time.sleep(0.001)


def test_a_declared_body_is_held_before_it_is_read(read_service: RunningServer) -> None:
    """A head declaring 6 MiB holds 6 MiB at once; a second 6 MiB body is refused 503 before
    the client has sent it (keep-alive, Connection: close and chunked alike), and the answer
    reaches the client, not a reset; once the first body is in, both are served exactly."""
    body, headers, batch = binary_body(HELD_BODY)
    with socket.create_connection(("127.0.0.1", read_service.port), timeout=30) as holder:
        holder.sendall(request_head(body, headers) + body[:1024])
        wait_for_in_flight(read_service, lambda held: held >= len(body))

        with socket.create_connection(("127.0.0.1", read_service.port), timeout=30) as refused:
            refused.sendall(request_head(body, headers) + body[:1024])  # the head, 1 KB more
            status, answer_headers, answer = read_response(refused)  # answered unread
            assert status == 503, answer
            assert answer_headers["retry-after"] == "1"
            message = orjson.loads(answer)["error"]
            assert f"reading this {len(body)}-byte body" in message
            assert f"{READ_BUDGET}-byte decode budget" in message
            refused.sendall(body[1024:])  # the rest is read and dropped by uvicorn ...
            small = mlp_body(3)
            refused.sendall(request_head(small, {}) + small)  # ... and the connection lives on
            assert read_response(refused)[0] == 200

        with httpx.Client(base_url=read_service.url, timeout=30) as http:
            closing = http.post(INFER, content=body, headers={**headers, "Connection": "close"})
            assert closing.status_code == 503, closing.text
            assert "decode budget" in error(closing, 503)

            def pieces() -> Iterator[bytes]:  # no Content-Length: chunked
                for start in range(0, len(body), MIB):
                    yield body[start : start + MIB]

            chunked = http.post(INFER, content=pieces(), headers=headers)
            assert "reading this body (" in error(chunked, 503)

        with socket.create_connection(("127.0.0.1", read_service.port), timeout=30) as closing:
            closing.sendall(request_head(body, headers, "Connection: close") + body)
            assert read_response(closing)[0] == 503  # read and dropped: no reset

        holder.sendall(body[1024:])
        status, _, answer = read_response(holder)
        assert status == 200, answer
    served = np.asarray(orjson.loads(answer)["outputs"][0]["data"], dtype=np.float32)
    expected = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["eval"]
    tolerance = 32 * float(np.finfo(np.float32).eps) * float(np.abs(expected).max())
    np.testing.assert_allclose(served.reshape(expected.shape), expected, rtol=0, atol=tolerance)
    wait_for_in_flight(read_service, lambda held: held == 0)


def test_a_body_given_up_midway_gives_its_share_back(read_service: RunningServer) -> None:
    body, headers, _ = binary_body(HELD_BODY)
    with socket.create_connection(("127.0.0.1", read_service.port), timeout=30) as holder:
        holder.sendall(request_head(body, headers) + body[: len(body) // 2])
        wait_for_in_flight(read_service, lambda held: held >= len(body))
    wait_for_in_flight(read_service, lambda held: held == 0)
    with httpx.Client(base_url=read_service.url, timeout=30) as http:
        assert http.post(INFER, content=body, headers=headers).status_code == 200


def test_a_chunked_body_is_held_as_it_grows_and_refused_when_it_stops_fitting(
    read_service: RunningServer,
) -> None:
    """Chunked: each piece is held as it arrives, then twice the body for the join. Alone, a
    3 MiB body fits (6 MiB joining) and a 6 MiB one does not (413: 12 MiB joining, no one
    else's fault); beside a held 6 MiB body, a 3 MiB one is refused 503 as soon as its
    pieces pass the 2 MiB left."""
    small_body, headers, batch = binary_body(3 * MIB, seed=3)
    large_body = binary_body(HELD_BODY)[0]

    def pieces(body: bytes) -> Iterator[bytes]:  # a generator: httpx sends it chunked
        for start in range(0, len(body), MIB // 4):
            yield body[start : start + MIB // 4]

    with httpx.Client(base_url=read_service.url, timeout=30) as http:
        fits = http.post(INFER, content=pieces(small_body), headers=headers)
        assert fits.status_code == 200, fits.text
        served = np.asarray(fits.json()["outputs"][0]["data"], dtype=np.float32)
        expected = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["eval"]
        tolerance = 32 * float(np.finfo(np.float32).eps) * float(np.abs(expected).max())
        np.testing.assert_allclose(served.reshape(expected.shape), expected, atol=tolerance)
        too_large = http.post(INFER, content=pieces(large_body), headers=headers)
        assert "joining the" in error(too_large, 413) and f"{READ_BUDGET}-byte" in too_large.text
        with socket.create_connection(("127.0.0.1", read_service.port), timeout=30) as holder:
            holder.sendall(request_head(large_body, headers))
            wait_for_in_flight(read_service, lambda held: held >= len(large_body))
            refused = http.post(INFER, content=pieces(small_body), headers=headers)
            message = error(refused, 503)
            held_when_refused = int(message.split("(")[1].split()[0])
            left = READ_BUDGET - len(large_body)
            assert left < held_when_refused <= left + MIB, message
    wait_for_in_flight(read_service, lambda held: held == 0)


# ---------------------------------------------------------------- settings


def test_the_default_budget_follows_the_body_limit_and_the_runs() -> None:
    """A largest binary body per concurrent run beside one largest body of JSON floats."""
    runs = Settings().resolved_concurrent_runs
    assert Settings().decode_budget == (runs + 8) * 64 * MIB
    assert Settings(max_body_bytes=MIB, concurrent_runs=3).decode_budget == 11 * MIB
    assert Settings(max_body_bytes=MIB, max_decode_bytes=3 * MIB).decode_budget == 3 * MIB
    floats = mlp_body(20_000)  # full-precision float32 values as orjson writes them
    assert decode_cost(floats, None) <= 8 * len(floats)


def test_serve_takes_max_decode_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    captured: dict[str, Any] = {}
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda app, **_: captured.update(app=app))
    result = CliRunner().invoke(
        cli_app,
        ["serve", "-r", str(tmp_path), "--device", "cpu", "--max-decode-bytes", "12345"],
        env={"BNFOLD_MAX_DECODE_BYTES": "1"},
    )
    assert result.exit_code == 0, result.output
    assert captured["app"].state.settings.decode_budget == 12345
    assert captured["app"].state.decode_budget.limit == 12345
    usage = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--max-decode-bytes" in usage
