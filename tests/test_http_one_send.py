"""A response's head and body leave in one write (`whole_response`).

`OneSendResponses` and `respond` against a transport that records its writes
(`respond` ending a real uvicorn request-response cycle), then a real server on
a raw socket: GET, HEAD (whose body uvicorn never writes), `Expect:
100-continue`, and inference on a kept-alive connection, each answered
completely.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bnfold.service.settings import Settings
from bnfold.service.whole_response import OneSendResponses, extension, respond

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

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


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


DATE = (b"date", b"Thu, 03 Dec 2026 12:00:00 GMT")
JSON = (b"content-type", b"application/json")


def _cycle(
    transport: RecordingTransport, *, keep_alive: bool = True
) -> tuple[RequestResponseCycle, list[str]]:
    """uvicorn's own cycle for a POST, as its protocol makes it; `ended` records
    `on_response` (the protocol's cue to start a pipelined request or the keep-alive timer)."""
    ended: list[str] = []
    cycle = RequestResponseCycle(
        scope={"type": "http", "method": "POST", "http_version": "1.1"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[DATE],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: ended.append("ended"),
    )
    return cycle, ended


async def _asgi_answer(keep_alive: bool) -> tuple[list[bytes], bool]:
    """What uvicorn's `send` writes for the same answer: its two messages."""
    transport = RecordingTransport()
    cycle, _ = _cycle(transport, keep_alive=keep_alive)
    headers = [(b"content-length", b"7"), JSON, (b"x-request-id", b"abc")]
    await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    await cycle.send({"type": "http.response.body", "body": b'{"a":1}'})
    return transport.writes, transport.closed


@pytest.mark.parametrize("keep_alive", [True, False])
def test_respond_writes_what_send_writes_in_one_write_and_ends_the_cycle(keep_alive: bool) -> None:
    transport = RecordingTransport()
    cycle, ended = _cycle(transport, keep_alive=keep_alive)
    assert respond(cycle, transport, 200, [JSON, (b"x-request-id", b"abc")], b'{"a":1}')  # type: ignore[arg-type]
    sent, closed = asyncio.run(_asgi_answer(keep_alive))
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    sent_head, _, sent_body = b"".join(sent).partition(b"\r\n\r\n")
    # the same status line and fields (Content-Length where respond puts it), the same body
    assert len(transport.writes) == 1 and body == sent_body == b'{"a":1}'
    assert sorted(head.split(b"\r\n")) == sorted(sent_head.split(b"\r\n"))
    assert (b"connection: close" in head) is (not keep_alive)
    assert transport.closed is closed is (not keep_alive)
    assert cycle.response_started and cycle.response_complete and cycle.message_event.is_set()
    assert ended == ["ended"]


def test_respond_writes_uvicorns_access_line_as_send_does(caplog: pytest.LogCaptureFixture) -> None:
    lines = []
    for answer in ("respond", "send"):
        transport = RecordingTransport()
        cycle, _ = _cycle(transport)
        cycle.access_log = True
        cycle.scope.update(client=("127.0.0.1", 5000), raw_path=b"/v2/x", query_string=b"a=1")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="test.access"):
            if answer == "respond":
                assert respond(cycle, transport, 201, [], b"")  # type: ignore[arg-type]
            else:
                start = {"type": "http.response.start", "status": 201, "headers": []}
                asyncio.run(cycle.send(start))  # type: ignore[arg-type]
        lines.append([record.getMessage() for record in caplog.records])
    assert lines[0] == lines[1] == ['127.0.0.1:5000 - "POST /v2/x?a=1 HTTP/1.1" 201']


def test_the_extension_answers_its_cycle_and_leaves_no_reference_cycle() -> None:
    """The scope holds the extension and the cycle the scope: the extension must hold the
    cycle weakly, or each request would be garbage only a collection frees."""
    transport = RecordingTransport()
    cycle, ended = _cycle(transport)
    cycle.scope["extensions"] = {"bnfold.respond": extension(cycle, transport)}  # type: ignore[arg-type]
    offered = cycle.scope["extensions"]["bnfold.respond"]
    assert offered["respond"](200, [JSON], b"{}") and ended == ["ended"]
    gone = weakref.ref(cycle)
    gc.disable()
    try:
        del cycle
        assert gone() is None  # freed by its reference count alone
    finally:
        gc.enable()
    assert not offered["respond"](200, [JSON], b"{}")  # a cycle gone: nothing to answer


def test_respond_sends_a_large_body_without_a_joined_copy() -> None:
    transport = RecordingTransport()
    cycle, _ = _cycle(transport)
    body = bytes(200_000)
    assert respond(cycle, transport, 200, [JSON], body)  # type: ignore[arg-type]
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\n" + body)
    assert b"content-length: 200000\r\n" in transport.writes[0]


@pytest.mark.parametrize("state", ["response_started", "disconnected", "write_paused"])
def test_respond_leaves_to_send_what_send_must_do(state: str) -> None:
    """A begun response, a gone client, a full buffer (send waits for it): nothing
    written, the cycle untouched, False."""
    transport = RecordingTransport()
    cycle, ended = _cycle(transport)
    if state == "write_paused":
        cycle.flow.pause_writing()
    else:
        setattr(cycle, state, True)
    assert not respond(cycle, transport, 200, [JSON], b"{}")  # type: ignore[arg-type]
    assert transport.writes == [] and not cycle.response_complete and ended == []


def test_respond_refuses_a_field_that_would_break_the_head_and_an_unknown_status() -> None:
    transport = RecordingTransport()
    cycle, _ = _cycle(transport)
    with pytest.raises(RuntimeError, match="header value"):
        respond(cycle, transport, 200, [(b"x-request-id", b"a\r\nset-cookie: b")], b"")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="header name"):
        respond(cycle, transport, 200, [(b"x id", b"a")], b"")  # type: ignore[arg-type]
    assert not respond(cycle, transport, 599, [], b"")  # type: ignore[arg-type]
    assert transport.writes == [] and not cycle.response_started


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


def test_inference_on_a_kept_alive_connection_is_answered_whole_each_time(
    server: RunningServer,
) -> None:
    """The lane answers through `respond`: each answer complete, one Content-Length, the
    connection kept for the next request."""
    payload = (
        b'{"inputs":[{"name":"input","shape":[1,8],"datatype":"FP32","data":[1,2,3,4,5,6,7,8]}]}'
    )
    request = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(payload) + payload
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        bodies = []
        for _ in range(2):
            connection.sendall(request)
            received = b""
            while b"\r\n\r\n" not in received:
                received += connection.recv(65536)
            status, fields, body = _split(received)
            while len(body) < int(fields[b"content-length"]):
                body += connection.recv(65536)
            assert status == b"HTTP/1.1 200 OK" and b"connection" not in fields
            assert received.lower().count(b"content-length") == 1
            # `respond` writes Content-Length last; starlette's response puts it first
            assert received.partition(b"\r\n\r\n")[0].endswith(b"content-length: %d" % len(body))
            assert fields[b"content-type"] == b"application/json" and b"x-request-id" in fields
            bodies.append(body)
    assert bodies[0] == bodies[1] and b'"outputs"' in bodies[0]
