"""A response's head and body leave in one write (`http_protocol.OneSendResponses`).

The class against a transport that records its writes, then a real server on a
raw socket: GET, HEAD (whose body uvicorn never writes), and `Expect:
100-continue`, each answered completely.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bnfold.service.http_protocol import OneSendResponses
from bnfold.service.settings import Settings

from service_packages import write_mlp
from service_server import RunningServer, running_server

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, pieces: tuple[bytes, ...]) -> None:
        self.writes.append(b"".join(bytes(piece) for piece in pieces))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_head_and_body_go_in_one_write_and_later_bodies_pass_through() -> None:
    transport = RecordingTransport()
    responses = OneSendResponses(transport)  # type: ignore[arg-type]
    responses.write(HEAD)
    assert transport.writes == []
    responses.write(b"ok")
    responses.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a later body chunk, whatever it holds
    assert transport.writes == [HEAD + b"ok", b"HTTP/1.1 200 OK\r\n\r\n"]


def test_a_large_body_joins_its_head_without_a_joined_copy() -> None:
    transport = RecordingTransport()
    responses = OneSendResponses(transport)  # type: ignore[arg-type]
    body = bytes(200_000)
    responses.write(HEAD)
    responses.write(memoryview(body))
    assert transport.writes == [HEAD + body]


def test_continue_goes_at_once_and_close_flushes_a_held_head() -> None:
    transport = RecordingTransport()
    responses = OneSendResponses(transport)  # type: ignore[arg-type]
    responses.write(CONTINUE)
    assert transport.writes == [CONTINUE]
    responses.write(HEAD)
    responses.close()
    assert transport.writes == [CONTINUE, HEAD] and transport.closed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("one-send") / "repository"
    write_mlp(repository, "mlp", 1, seed=1)
    with running_server(Settings(repository=repository, device="cpu")) as running:
        yield running


def _exchange(port: int, request: bytes, *, then: bytes = b"") -> bytes:
    """Send `request` (and `then`, once the server said 100 Continue), read to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        received = b""
        if then:
            while CONTINUE not in received:
                received += connection.recv(65536)
            connection.sendall(then)
        while chunk := connection.recv(65536):
            received += chunk
        return received


def _split(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in lines)
    return status, fields, body


def test_get_and_head_are_answered_whole(server: RunningServer) -> None:
    get = _exchange(
        server.port, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status, fields, body = _split(get)
    assert status == b"HTTP/1.1 200 OK" and int(fields[b"content-length"]) == len(body) > 0
    # HEAD on a connection kept alive: no body write, and no close, would flush a held head
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(b"HEAD /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
    status, fields, body = _split(received)
    # whatever the route answers HEAD with (405 here), the head arrives and nothing after it
    assert status.startswith(b"HTTP/1.1 ") and b"content-length" in fields and body == b""


def test_expect_continue_then_inference(server: RunningServer, tmp_path: Path) -> None:
    payload = (
        b'{"inputs":[{"name":"input","shape":[1,8],"datatype":"FP32","data":[0,0,0,0,0,0,0,0]}]}'
    )
    request = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(payload)
    )
    answer = _exchange(server.port, request, then=payload)
    assert answer.startswith(CONTINUE)
    status, fields, body = _split(answer[len(CONTINUE) :])
    assert status == b"HTTP/1.1 200 OK"
    assert int(fields[b"content-length"]) == len(body) and b'"outputs"' in body
    assert b"x-request-id" in fields
