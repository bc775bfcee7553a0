"""The access log and the JSON log format: one line per request, REST and gRPC, off the loop.

Real servers and clients; the log lines are what the process's handler writes
(`configure_logging` into a StringIO, or a real `bnfold serve` subprocess's stderr).
The expected byte counts are the lengths of what the client sent and received.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
from reliability.harness import server_process
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bnfold.service.access_log import (
    _MESSAGE,
    AccessEntry,
    AccessLog,
    access_level,
    access_message,
    access_record,
    write_batch,
)
from bnfold.service.request_log import (
    CURRENT_REQUEST,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
    direct_access_lines,
    log_handler,
    request_context,
)
from bnfold.service.rest.access import finish_request
from bnfold.service.settings import LogFormat, LogLevel

from service_packages import MLP_IN
from service_server import RunningServer, grpc_settings, running_server

DEADLINE_SECONDS = 10.0


def mlp_body() -> bytes:
    batch = np.linspace(-1, 1, 3 * MLP_IN, dtype=np.float32).reshape(3, MLP_IN)
    request = {
        "inputs": [
            {"name": "input", "shape": [3, MLP_IN], "datatype": "FP32", "data": batch.tolist()}
        ]
    }
    return orjson.dumps(request)


@pytest.fixture(scope="module")
def server(service_repository: Path) -> Iterator[RunningServer]:
    with running_server(grpc_settings(service_repository)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


class LogCapture:
    """The process's log lines (`configure_logging` into a buffer), parsed as JSON."""

    def __init__(self, log_format: LogFormat, level: LogLevel) -> None:
        self.stream = io.StringIO()
        self.log_format = log_format
        self.level = level

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def wait_for(self, request_id: str) -> list[dict]:
        """The JSON access lines about `request_id`, once there is one."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            found = [
                record
                for record in map(json.loads, self.lines())
                if record["logger"] == "bnfold.access" and record.get("request_id") == request_id
            ]
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no access line for {request_id}:\n" + "\n".join(self.lines())
                )
            time.sleep(0.02)


@pytest.fixture
def capture(request: pytest.FixtureRequest) -> Iterator[LogCapture]:
    log_format, level = getattr(request, "param", (LogFormat.JSON, LogLevel.INFO))
    root = logging.getLogger()
    handlers, previous_level = root.handlers[:], root.level
    logs = LogCapture(log_format, level)
    configure_logging(level, log_format, logs.stream)
    try:
        yield logs
    finally:
        root.handlers[:] = handlers
        root.setLevel(previous_level)


def test_access_line_of_a_200(
    client: httpx.Client, server: RunningServer, capture: LogCapture
) -> None:
    body = mlp_body()
    response = client.post(
        "/v2/models/mlp/versions/2/infer",
        content=body,
        headers={"Content-Type": "application/json", "X-Request-ID": "access-200"},
    )
    assert response.status_code == 200
    (line,) = capture.wait_for("access-200")
    assert line["level"] == "INFO"
    assert line["method"] == "POST"
    assert line["path"] == "/v2/models/mlp/versions/2/infer"
    assert (line["model"], line["version"]) == ("mlp", "2")
    assert line["status"] == 200
    assert line["bytes_in"] == len(body)
    assert line["bytes_out"] == len(response.content)
    assert line["latency_ms"] > 0
    assert line["client"].startswith("127.0.0.1:")
    assert '"POST /v2/models/mlp/versions/2/infer" 200' in line["message"]
    assert line["time"].endswith("Z")


def test_access_line_of_a_compare_names_the_version_that_answered(
    client: httpx.Client, capture: LogCapture
) -> None:
    batch = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
    tensor = {"name": "input", "shape": [4, 8], "datatype": "FP32", "data": batch.ravel().tolist()}
    response = client.post(
        "/v2/models/mlp/compare",
        json={"inputs": [tensor]},
        headers={"X-Request-ID": "access-compare"},
    )
    assert response.status_code == 200, response.text
    (line,) = capture.wait_for("access-compare")
    assert (line["model"], line["version"]) == ("mlp", response.json()["model_version"])
    assert line["path"] == "/v2/models/mlp/compare" and line["status"] == 200


@pytest.mark.parametrize(
    ("path", "status", "model"),
    [
        ("/v2/models/no_such_model/infer", 404, "no_such_model"),
        ("/v2/models/broken_hash/infer", 503, "broken_hash"),
    ],
)
def test_access_line_of_an_error(
    client: httpx.Client, capture: LogCapture, path: str, status: int, model: str
) -> None:
    request_id = f"access-{status}"
    body = mlp_body()
    response = client.post(
        path, content=body, headers={"Content-Type": "application/json", "X-Request-ID": request_id}
    )
    assert response.status_code == status
    (line,) = capture.wait_for(request_id)
    assert (line["status"], line["model"], line["version"]) == (status, model, None)
    assert line["bytes_out"] == len(response.content)
    # refused before the body was read (admission): what was read, not what was sent
    assert 0 <= line["bytes_in"] <= len(body)


def test_probes_at_debug_only(client: httpx.Client, capture: LogCapture) -> None:
    """At INFO, a successful probe writes no line; the request after it does."""
    assert client.get("/v2/health/live", headers={"X-Request-ID": "probe-1"}).status_code == 200
    assert client.get("/metrics", headers={"X-Request-ID": "probe-2"}).status_code == 200
    client.get("/v2/models/mlp", headers={"X-Request-ID": "after-probe"})
    capture.wait_for("after-probe")  # written in order: the probes' entries came first
    text = capture.stream.getvalue()
    assert "probe-1" not in text and "probe-2" not in text


@pytest.mark.parametrize("capture", [(LogFormat.JSON, LogLevel.DEBUG)], indirect=True)
def test_probe_logged_at_debug(client: httpx.Client, capture: LogCapture) -> None:
    client.get("/v2/health/live", headers={"X-Request-ID": "probe-3"})
    (line,) = capture.wait_for("probe-3")
    assert (line["level"], line["status"], line["path"]) == ("DEBUG", 200, "/v2/health/live")


def test_the_app_writes_lines_straight_from_entries(server: RunningServer) -> None:
    """The running app's access log is given the chooser of direct lines (what a request's
    line looks like either way is the other tests' business)."""
    assert server.app.state.access_log.direct_lines is direct_access_lines


@pytest.mark.parametrize("capture", [(LogFormat.TEXT, LogLevel.INFO)], indirect=True)
def test_text_access_line(client: httpx.Client, capture: LogCapture) -> None:
    response = client.get("/v2/models/mlp/versions/1", headers={"X-Request-ID": "text-1"})
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not any("[req=text-1]" in line for line in capture.lines()):
        assert time.monotonic() < deadline, capture.stream.getvalue()
        time.sleep(0.02)
    (line,) = [line for line in capture.lines() if "[req=text-1]" in line]
    assert " INFO    bnfold.access [req=text-1]: 127.0.0.1:" in line
    assert '"GET /v2/models/mlp/versions/1" 200 model=mlp version=1 in=0 ' in line
    assert f" out={len(response.content)} " in line


def test_grpc_access_line(server: RunningServer, capture: LogCapture) -> None:
    """Unversioned: the line names the version that answered (the latest, 2)."""
    request = service_pb2.ModelInferRequest(model_name="mlp", id="grpc-access-1")
    request.inputs.add(name="input", datatype="FP32", shape=[1, MLP_IN])
    request.raw_input_contents.append(np.ones((1, MLP_IN), np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        with pytest.raises(grpc.RpcError):
            stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name="nope"),
                metadata=(("x-request-id", "grpc-access-2"),),
            )
    (line,) = capture.wait_for("grpc-access-1")
    assert line["method"] == "GRPC"
    assert line["path"] == "/inference.GRPCInferenceService/ModelInfer"
    assert (line["model"], line["version"], line["grpc_status"]) == ("mlp", "2", "OK")
    assert "status" not in line
    assert (line["bytes_in"], line["bytes_out"]) == (request.ByteSize(), response.ByteSize())
    (failed,) = capture.wait_for("grpc-access-2")
    assert (failed["grpc_status"], failed["model"]) == ("NOT_FOUND", "nope")


def entry(number: int) -> AccessEntry:
    return AccessEntry(
        time.time(), "GET", f"/n/{number}", None, None, 200, 0, 0, 1000, f"q-{number}", None
    )


def test_queue_bounded_drops_counted() -> None:
    """A full queue drops and counts, never waits; the writer writes what was kept, in order,
    and warns about the drops."""
    written: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(record)

    access_logger = logging.getLogger("test.access.bounded")
    service_logger = logging.getLogger("bnfold.service")
    keep = Keep()
    access_logger.addHandler(keep)
    access_logger.setLevel(logging.INFO)
    service_logger.addHandler(keep)
    try:
        access_log = AccessLog(capacity=5, interval=0.01, logger_name=access_logger.name)
        for number in range(50):
            access_log.record(entry(number))
        assert (access_log.pending, access_log.dropped) == (5, 45)
        access_log.start()
        access_log.stop()
    finally:
        access_logger.removeHandler(keep)
        service_logger.removeHandler(keep)
    lines = [record for record in written if record.name == access_logger.name]
    assert [record.request_id for record in lines] == [f"q-{number}" for number in range(5)]
    warnings = [record.getMessage() for record in written if record.name == "bnfold.service"]
    assert any("45 line(s) dropped" in message for message in warnings)


ODD_ENTRIES = [
    # (time, method, path, model, version, status, in, out, latency ns, request id, client)
    (1_764_000_000.0, "POST", "/v2/models/m/infer", "m", "1", 200, 1375, 300, 123_456, "a1",
     ("127.0.0.1", 5555)),
    (1_764_000_000.9996, "GET", "/v2/health/ready", None, None, 200, 0, 0, 999, None, None),
    (1_764_000_001.5, "GET", "/v2/health/ready", None, None, 503, 0, 52, 10**9, "r", None),
    (1_764_000_059.0004, "/inference.GRPCInferenceService/ModelInfer", "x", "m", None,
     "RESOURCE_EXHAUSTED", 12, 0, 5, "g-9", "ipv6:[::1]:5000"),
    (1_700_000_000.25, "POST", "/v2/models/m/versions/2/infer", "m", "2", 422, 7, 99, 0,
     "-", ("::1", 80)),
]  # fmt: skip


@pytest.mark.parametrize("log_format", [LogFormat.TEXT, LogFormat.JSON])
def test_direct_lines_are_the_records_lines(log_format: LogFormat) -> None:
    """The app's formatters write an access line straight from its entry; it must be the
    line the same formatter makes of the entry's log record, filters applied."""
    handler = log_handler(log_format, io.StringIO())
    for fields in ODD_ENTRIES:
        access_entry = AccessEntry(*fields)
        record = access_record(access_entry, "bnfold.access")
        assert handler.filter(record)
        level = access_level(access_entry)
        assert record.levelno == level
        direct = handler.formatter.format_access(access_entry, level, "bnfold.access")
        assert direct == handler.format(record)


def test_batch_of_lines_as_handle_writes_them() -> None:
    """One write for a batch: the same text `handle` writes line by line, through the
    direct path (the app's handler) and the record path (a handler with a filter of its
    own, which must see every record)."""
    seen: list[str] = []

    def foreign(record: logging.LogRecord) -> bool:
        seen.append(record.getMessage())
        return record.levelno >= logging.INFO

    entries = [(AccessEntry(*fields), access_level(AccessEntry(*fields))) for fields in ODD_ENTRIES]
    for add_filter in (False, True):
        batched, one_by_one = (
            log_handler(LogFormat.TEXT, io.StringIO()),
            log_handler(LogFormat.TEXT, io.StringIO()),
        )
        if add_filter:
            batched.addFilter(foreign)
            one_by_one.addFilter(foreign)
        direct = direct_access_lines(batched)
        assert (direct is None) is add_filter
        write_batch(batched, entries, "bnfold.access", direct)
        for access_entry, _ in entries:
            one_by_one.handle(access_record(access_entry, "bnfold.access"))
        assert batched.stream.getvalue() == one_by_one.stream.getvalue()
        assert (
            batched.stream.getvalue().count("\n") == len(entries) - add_filter
        )  # the filter drops the DEBUG probe line
    assert len(seen) == 2 * len(entries)


def test_subclasses_and_foreign_parts_get_records() -> None:
    """Only a handler exactly as the app makes it gets lines straight from entries: a
    subclass's own `format` or `filter`, or another time format, must still apply, and
    other handlers get the record with its message template and arguments."""
    access_entry = AccessEntry(*ODD_ENTRIES[0])

    class Tagged(JsonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            return super().format(record)[:-1] + ',"service":"bnfold"}'

    class NoProbes(RequestIdFilter):
        def filter(self, record: logging.LogRecord) -> bool:
            return super().filter(record) and record.levelno > logging.DEBUG

    class Dotted(TextFormatter):
        default_msec_format = "%s.%03d"

    assert direct_access_lines(log_handler(LogFormat.TEXT, io.StringIO())) is not None
    assert direct_access_lines(log_handler(LogFormat.JSON, io.StringIO())) is not None
    for formatter in (Tagged(), Dotted(), JsonFormatter("%(message)s")):
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        if isinstance(formatter, Tagged | Dotted):
            assert direct_access_lines(handler) is None
        direct = direct_access_lines(handler)
        write_batch(handler, [(access_entry, logging.INFO)], "bnfold.access", direct)
        record = access_record(access_entry, "bnfold.access")
        assert handler.stream.getvalue() == formatter.format(record) + "\n"
    assert '"service":"bnfold"' in Tagged().format(access_record(access_entry))
    filtered = log_handler(LogFormat.TEXT, io.StringIO())
    filtered.filters[:] = [NoProbes()]
    assert direct_access_lines(filtered) is None
    probe = AccessEntry(*ODD_ENTRIES[1])
    write_batch(filtered, [(probe, access_level(probe))], "bnfold.access", None)
    assert filtered.stream.getvalue() == ""
    record = access_record(access_entry)
    assert record.msg == _MESSAGE
    assert record.args is not None and record.getMessage() == access_message(access_entry)


def test_writer_sleeps_until_an_entry_comes() -> None:
    """The writer wakes for an entry, not on a timer: it writes each batch within about
    `interval` of its first entry, also after idling far longer than `interval`, and
    `stop` writes what is left."""
    written: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(record.request_id)

    access_logger = logging.getLogger("test.access.wake")
    keep = Keep()
    access_logger.addHandler(keep)
    access_logger.setLevel(logging.INFO)
    wakes: list[int] = []

    class CountedWakes(AccessLog):
        def write_pending(self) -> None:
            wakes.append(self.pending)
            super().write_pending()

    access_log = CountedWakes(interval=0.01, logger_name=access_logger.name)
    access_log.start()
    try:
        for batch in range(3):
            time.sleep(0.2)  # idle: twenty intervals, and no wake-up that finds nothing
            assert all(wakes) and sum(wakes) == 10 * batch, wakes
            numbers = range(10 * batch, 10 * batch + 10)
            for number in numbers:
                access_log.record(entry(number))
            deadline = time.monotonic() + DEADLINE_SECONDS
            while len(written) < 10 * (batch + 1) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert written[-10:] == [f"q-{number}" for number in numbers]
            assert access_log.pending == 0
        access_log.record(entry(99))
    finally:
        access_log.stop()
        access_logger.removeHandler(keep)
    assert written[-1] == "q-99"
    assert len(written) == 31


def test_no_entry_when_no_line_would_be_written() -> None:
    """Above INFO (`--log-level warning`) no access line is written, so none is queued:
    the writer thread has nothing to format; at INFO the entry is queued again."""
    access_logger = logging.getLogger("test.access.quiet")
    access_log = AccessLog(logger_name=access_logger.name)
    scope = {"method": "POST", "path": "/v2/models/m/infer", "client": ("127.0.0.1", 1)}
    try:
        for level, queued in ((logging.WARNING, 0), (logging.INFO, 1), (logging.DEBUG, 2)):
            access_logger.setLevel(level)
            context = request_context(None)
            token = CURRENT_REQUEST.set(context)
            finish_request(access_log, token, scope, context, 200, 10, 20, time.perf_counter_ns())
            assert access_log.writes_lines is (level <= logging.INFO)
            assert access_log.pending == queued
    finally:
        access_logger.setLevel(logging.NOTSET)


def test_serve_writes_json_lines(service_repository: Path) -> None:
    """`bnfold serve --log-format json`: every stderr line is a JSON object, uvicorn's own
    included, and a request's access line carries its id."""
    with server_process(service_repository, "--log-format", "json") as serving:
        response = httpx.get(
            f"{serving.url}/v2/models/mlp", headers={"X-Request-ID": "subprocess-1"}, timeout=30
        )
        assert response.status_code == 200
        deadline = time.monotonic() + DEADLINE_SECONDS
        while "subprocess-1" not in serving.log_text():
            assert time.monotonic() < deadline, serving.log_text()
            time.sleep(0.05)
        records = [json.loads(line) for line in serving.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    assert any(record["logger"].startswith("uvicorn") for record in records)
    (access,) = [record for record in records if record.get("request_id") == "subprocess-1"]
    assert (access["logger"], access["status"], access["model"]) == ("bnfold.access", 200, "mlp")
