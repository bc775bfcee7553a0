"""A real uvicorn server in a background thread, for the service tests.

Port 0: the kernel picks a free port and uvicorn reports it, so parallel test
runs never collide. gRPC is off unless the settings turn it on (conftest.py sets
BNFOLD_GRPC=false for the whole run: 8001 is Triton's port and may be taken);
gRPC tests pass `grpc=True, grpc_port=0` and read the chosen port here. The server runs the app's lifespan exactly as `bnfold
serve` does, with the uvicorn options `bnfold serve` uses (protocol, request-head
limits, shutdown grace: `uvicorn_options`); leaving the context shuts it down
gracefully.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from bnfold.service.rest.app import create_app
from bnfold.service.server_options import uvicorn_options
from bnfold.service.settings import Settings
from bnfold.service.tracing import Tracing

START_TIMEOUT_SECONDS = 30.0
ADMIN_TOKEN = "test-admin-token"


@dataclass(frozen=True)
class RunningServer:
    app: FastAPI
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"{self.host}:{self.port}"

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC server, as tritonclient.grpc wants it (gRPC must be on)."""
        port = self.app.state.grpc_port
        if port is None:
            raise RuntimeError("this test server runs without gRPC: Settings(grpc=True, ...)")
        return f"{self.host}:{port}"


@contextmanager
def running_server(settings: Settings, tracing: Tracing | None = None) -> Iterator[RunningServer]:
    app = create_app(settings, tracing=tracing)
    options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": 0, "log_level": "warning"}
    config = uvicorn.Config(app, lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("the test server did not start in time")
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(app, "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def admin_server(repository: Path) -> Iterator[RunningServer]:
    """A CPU server on `repository` with the test admin token: what the session fixtures share."""
    settings = Settings(repository=repository, device="cpu", admin_token=ADMIN_TOKEN)
    with running_server(settings) as server:
        yield server


def grpc_settings(repository: Path, **settings: object) -> Settings:
    """A CPU server with gRPC, on a free port unless `settings` name one (conftest.py turns
    gRPC off by default)."""
    defaults: dict[str, object] = {"device": "cpu", "grpc": True, "grpc_port": 0}
    return Settings(repository=repository, **{**defaults, **settings})
