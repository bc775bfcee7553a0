"""Fixtures of the reliability suite: its repository, an in-process server and a server process.

The in-process server (tests/service_server.py) serves the request-level cases
(hostile input, fuzzing, security); the `bnfold serve` process (harness.py)
serves the load cases, where the server must have its own cores and its memory
is measured. Tests that change what a server serves (unload, reload) start
their own on a copy of the repository.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness import ServerProcess, server_process
from .packages import build_reliability_repository
from service_server import RunningServer, admin_server


@pytest.fixture(scope="session")
def reliability_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only for tests; copy it (service_packages.copy_repository) to change it."""
    return build_reliability_repository(tmp_path_factory.mktemp("reliability") / "repository")


@pytest.fixture(scope="session")
def reliability_service(reliability_repository: Path) -> Iterator[RunningServer]:
    with admin_server(reliability_repository) as server:
        yield server


@pytest.fixture()
def client(reliability_service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=reliability_service.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="session")
def load_server(reliability_repository: Path) -> Iterator[ServerProcess]:
    """`bnfold serve` on the reliability repository, read-only tests only."""
    with server_process(reliability_repository) as server:
        yield server
