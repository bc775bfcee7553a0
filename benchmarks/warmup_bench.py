"""Warm-up benchmark: what `--warmup` costs at start and what it saves the first request.

For the digits MLP (V2 JSON) and ResNet-18 (binary tensors), each served alone
from a repository of its own (version 1 of the serving benchmark's packages,
hard-linked), `bnfold serve` is started fresh `--starts` times with warm-up on
and as often with it off, in interleaved rounds (on/off, then off/on, so a
drift of the machine's load hits both alike). Each start measures:

* start to READY: from the process's launch to `/v2/health/ready` answering 200
  (Python's imports included), and the warm-up's own time from the server's log
  line (`warmed up NAME version 1 in X ms`);
* the first real request: one sample, seeded random data (not the warm-up's
  zeros), on a keep-alive connection opened by a health check before it;
* the steady p50 of the `--requests` requests sent right after it, the same
  way, one at a time.

The client is a raw socket sending prepared bytes (`KeepAlive`): a Python HTTP
client's own first-call costs would count against the server's first request.

The goal (issue 16): with warm-up on, the first request within 2x the steady p50.

Prints the table and saves benchmarks/out/warmup/results.json; BENCHMARKS.md is
written by hand from it.

    python benchmarks/warmup_bench.py [--starts 5] [--requests 50] [--models digits_mlp resnet18]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from report_section import describe_machine
from serving.harness import BNFOLD, WORK, ensure_repository, free_port, input_shape, serve

OUT = WORK.parent / "warmup"
ENCODING = {"digits_mlp": "json", "resnet18": "binary"}
GOAL_RATIO = 2.0
WARMED = re.compile(r"warmed up (\S+) version \d+ in ([0-9.]+) ms")


@dataclass(frozen=True)
class Start:
    """One fresh server start and its first requests."""

    model: str
    warmup: bool
    ready_s: float
    warmup_ms: float | None
    first_ms: float
    steady_p50_ms: float

    @property
    def ratio(self) -> float:
        return self.first_ms / self.steady_p50_ms


def model_repository(source: Path, model: str) -> Path:
    """OUT/repositories/MODEL: version 1 of `model` alone, hard-linked from `source` (copied
    when links cannot be made); rebuilt when the source package changed."""
    repository = OUT / "repositories" / model
    package, target = source / model / "1", repository / model / "1"
    manifest = (package / "manifest.json").read_bytes()
    if not (target / "manifest.json").is_file() or (target / "manifest.json").read_bytes() != (
        manifest
    ):
        shutil.rmtree(repository, ignore_errors=True)
        target.parent.mkdir(parents=True)

        def link(from_path: str, to_path: str) -> None:
            try:
                os.link(from_path, to_path)
            except OSError:
                shutil.copy2(from_path, to_path)

        shutil.copytree(package, target, copy_function=link)
    return repository


def request_body(repository: Path, model: str) -> tuple[bytes, dict[str, str]]:
    """One seeded random sample of `model`'s input, as V2 JSON or binary tensors."""
    sample = np.random.default_rng(16).normal(size=input_shape(repository, model))
    sample = sample.astype(np.float32)
    tensor = {"name": "input", "shape": list(sample.shape), "datatype": "FP32"}
    if ENCODING[model] == "json":
        body = {"inputs": [{**tensor, "data": sample.reshape(-1).tolist()}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": sample.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + sample.tobytes(), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


class KeepAlive:
    """One keep-alive HTTP/1.1 connection sending prepared requests, reading whole answers."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port))
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def exchange(self, request: bytes) -> int:
        """Send `request`, read its answer; returns the status code."""
        self._socket.sendall(request)
        while b"\r\n\r\n" not in self._buffer:
            self._receive()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(fields["content-length"])
        while len(self._buffer) < length:
            self._receive()
        self._buffer = self._buffer[length:]
        return int(lines[0].split()[1])

    def _receive(self) -> None:
        chunk = self._socket.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk

    def close(self) -> None:
        self._socket.close()


def http_request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Length": str(len(body)), **headers}
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def one_start(repository: Path, model: str, warmup: bool, requests: int) -> Start:
    port = free_port()
    name = f"warmup-{model}-{'on' if warmup else 'off'}"
    command = [
        *BNFOLD,
        "serve",
        "--repository",
        str(repository),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "info",
        "--no-grpc",
        "--warmup" if warmup else "--no-warmup",
    ]
    body, headers = request_body(repository, model)
    infer = http_request("POST", f"/v2/models/{model}/infer", body, **headers)
    with serve(name, command, port) as server:
        connection = KeepAlive(port)
        try:
            if connection.exchange(http_request("GET", "/v2/health/ready")) != 200:
                raise RuntimeError(f"{name} is not ready")
            latencies = []
            for _ in range(requests + 1):
                started = time.perf_counter()
                status = connection.exchange(infer)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"{name} answered {status}; see its log")
        finally:
            connection.close()
        log = (WORK / f"{name}.log").read_text()
    warmed = [float(ms) for found, ms in WARMED.findall(log) if found == model]
    return Start(
        model=model,
        warmup=warmup,
        ready_s=server.ready_seconds,
        warmup_ms=warmed[0] if warmed else None,
        first_ms=latencies[0] * 1e3,
        steady_p50_ms=statistics.median(latencies[1:]) * 1e3,
    )


def summary(starts: list[Start]) -> list[dict[str, object]]:
    rows = []
    for model in dict.fromkeys(start.model for start in starts):
        for warmup in (True, False):
            runs = [start for start in starts if start.model == model and start.warmup == warmup]
            warmup_times = [start.warmup_ms for start in runs if start.warmup_ms is not None]
            rows.append(
                {
                    "model": model,
                    "encoding": ENCODING[model],
                    "warmup": warmup,
                    "starts": len(runs),
                    "ready_s": statistics.median(start.ready_s for start in runs),
                    "warmup_ms": statistics.median(warmup_times) if warmup_times else None,
                    "first_ms": statistics.median(start.first_ms for start in runs),
                    "steady_p50_ms": statistics.median(start.steady_p50_ms for start in runs),
                    "ratio_median": statistics.median(start.ratio for start in runs),
                    "ratio_max": max(start.ratio for start in runs),
                    "within_goal": sum(start.ratio <= GOAL_RATIO for start in runs),
                }
            )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    print(
        "| model | warm-up | start to READY (s) | warm-up (ms) | first request (ms) | "
        "steady p50 (ms) | first / p50, median (max) | starts within 2x |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        warmup_ms = "-" if row["warmup_ms"] is None else f"{row['warmup_ms']:.1f}"
        print(
            f"| {row['model']} ({row['encoding']}) | {'on' if row['warmup'] else 'off'} | "
            f"{row['ready_s']:.2f} | {warmup_ms} | {row['first_ms']:.2f} | "
            f"{row['steady_p50_ms']:.2f} | {row['ratio_median']:.2f} ({row['ratio_max']:.2f}) | "
            f"{row['within_goal']} of {row['starts']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="fresh starts per setting")
    parser.add_argument("--requests", type=int, default=50, help="requests after the first")
    parser.add_argument("--models", nargs="+", default=list(ENCODING), choices=list(ENCODING))
    args = parser.parse_args()
    source = ensure_repository()
    OUT.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    starts = []
    for model in args.models:
        repository = model_repository(source, model)
        for round_number in range(args.starts):
            order = (True, False) if round_number % 2 == 0 else (False, True)
            for warmup in order:
                start = one_start(repository, model, warmup, args.requests)
                print(
                    f"{model} warm-up {'on ' if warmup else 'off'}: ready {start.ready_s:.2f} s, "
                    f"first {start.first_ms:.2f} ms, p50 {start.steady_p50_ms:.2f} ms "
                    f"({start.ratio:.2f}x)",
                    file=sys.stderr,
                )
                starts.append(start)
    rows = summary(starts)
    machine = describe_machine(("onnxruntime", "fastapi", "uvicorn", "numpy"))
    print(machine.line(load_start, os.getloadavg()[0]))
    print_table(rows)
    results = {
        "machine": asdict(machine),
        "requests": args.requests,
        "summary": rows,
        "starts": [asdict(start) for start in starts],
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
