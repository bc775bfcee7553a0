"""`bnfold serve` as a user runs it, with gRPC: the address in the log, `--no-grpc`, and
`--workers 2` sharing one gRPC port. Real processes (tests/reliability/harness.py)."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from reliability.harness import server_process

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights

FLOAT32_EPS = float(np.finfo(np.float32).eps)
GRPC_LOG = re.compile(r"gRPC on 127\.0\.0\.1:(\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def infer_mlp(address: str, rows: int) -> None:
    """One inference over gRPC, checked against the numpy reference of mlp version 2."""
    batch = np.random.default_rng(rows).normal(size=(rows, 8)).astype(np.float32)
    tensor = triton.InferInput("input", [rows, 8], "FP32")
    tensor.set_data_from_numpy(batch)
    client = triton.InferenceServerClient(address)
    try:
        served = client.infer("mlp", [tensor]).as_numpy("output")
    finally:
        client.close()
    expected = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["eval"]
    tolerance = 32 * FLOAT32_EPS * float(np.abs(expected).max())
    np.testing.assert_allclose(served, expected, rtol=0, atol=tolerance)


def test_serve_logs_the_grpc_address_and_serves_it(service_repository: Path) -> None:
    with server_process(service_repository) as server:
        (port,) = GRPC_LOG.findall(server.log_text())
        assert "bnfold serve: repository" in server.log_text()
        infer_mlp(f"127.0.0.1:{port}", 3)


def test_no_grpc_serves_rest_only(service_repository: Path) -> None:
    port = free_port()
    with server_process(service_repository, "--no-grpc", "--grpc-port", str(port)) as server:
        assert not GRPC_LOG.search(server.log_text())
        assert "gRPC off" in server.log_text()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_workers_share_one_grpc_port(service_repository: Path) -> None:
    port = free_port()
    with server_process(service_repository, "--workers", "2", "--grpc-port", str(port)) as server:
        assert GRPC_LOG.findall(server.log_text()) == [str(port), str(port)]
        for rows in range(1, 9):  # new connections: the kernel spreads them over both
            infer_mlp(f"127.0.0.1:{port}", rows)


def test_sigterm_starts_the_grpc_drain_beside_the_rest_one(grpc_repository: Path) -> None:
    """SIGTERM without a drain window while a REST request runs for seconds: gRPC refuses new
    calls at once (its drain began with the signal, not after REST's), the REST request is
    answered, the process exits cleanly, well within one grace period. (With a window, both
    stop at its end: tests/reliability/test_drain.py.)"""
    import signal
    import time

    import httpx
    from reliability.harness import wait_for_metric

    rows, width = 9000, 256  # about three seconds of the slow model
    batch = np.random.default_rng(5).normal(size=(rows, width)).astype(np.float32)
    body = {
        "inputs": [
            {
                "name": "x",
                "shape": [rows, width],
                "datatype": "FP32",
                "data": batch.ravel().tolist(),
            }
        ]
    }
    with server_process(
        grpc_repository, "--shutdown-grace", "20", "--threads", "1", "--drain-seconds", "0"
    ) as server:
        (port,) = GRPC_LOG.findall(server.log_text())
        answers: dict[str, object] = {}

        def rest_call() -> None:
            answers["rest"] = httpx.post(
                f"{server.url}/v2/models/slow/infer", json=body, timeout=60
            )

        caller = threading.Thread(target=rest_call)
        caller.start()
        wait_for_metric(server.url, "bnfold_requests_in_flight", 1, 30, endpoint="infer")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        refused = None
        while refused is None and time.monotonic() - started < 2:
            try:
                client.is_server_live()
            except Exception as error:
                refused = error
            time.sleep(0.02)
        client.close()
        assert refused is not None, "gRPC still took calls 2 s after SIGTERM"
        assert caller.is_alive(), "the REST request should still be running: pick more rows"
        caller.join(60)
        # uvicorn re-raises the SIGTERM it caught once it has shut down: killed by it, cleanly
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        elapsed = time.monotonic() - started
    assert answers["rest"].status_code == 200, answers["rest"].text
    assert elapsed < 20
    assert "gRPC: draining calls in flight" in server.log_text()
