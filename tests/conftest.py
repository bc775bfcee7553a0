"""Shared fixtures. Each block below belongs to the part of bnfold named in its heading."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bnfold.service.settings import Settings

from service_packages import build_test_repository
from service_server import ADMIN_TOKEN, RunningServer, admin_server, grpc_settings, running_server

# Settings read the environment: every test server runs without gRPC unless its test turns
# it on (with grpc_port=0). A real `bnfold serve` would take Triton's port 8001, which
# another server, or a test running beside this one, may hold. Child processes inherit it.
os.environ["BNFOLD_GRPC"] = "false"
# No drain window on SIGTERM (service/drain.py) unless a test asks for one with
# --drain-seconds: the shutdown tests time what follows the signal.
os.environ["BNFOLD_DRAIN_SECONDS"] = "0"
# The drift monitor measures every sample it takes in tests (no CPU budget) unless a test
# sets one: its tests compare windows with every request sent.
os.environ["BNFOLD_DRIFT_CPU_BUDGET"] = "0"


@pytest.fixture(autouse=True)
def _no_handler_on_a_closed_stream() -> Iterator[None]:
    """A test that runs `bnfold serve` in-process (CliRunner) leaves the root logger
    writing to its runner's stream, closed when the test ends; the session's servers
    would then print "--- Logging error ---" for each later line. Drop such handlers."""
    yield
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if getattr(getattr(handler, "stream", None), "closed", False):
            root.removeHandler(handler)


# ---------------------------------------------------------------- service fixtures

DIGITS_MODELS = ("digits_mlp", "digits_resnet", "digits_mobilenet", "digits_conv1d")


@pytest.fixture(scope="session")
def service_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torch-free test packages (tests/service_packages.py); read-only for tests.

    Tests that change a repository (load, unload, cache files) copy it first.
    """
    return build_test_repository(tmp_path_factory.mktemp("service") / "repository")


@pytest.fixture(scope="session")
def service(service_repository: Path) -> Iterator[RunningServer]:
    """One server on the test packages for the read-only tests, admin token set."""
    with admin_server(service_repository) as server:
        yield server


def _current_single_version(model_dir: Path) -> bool:
    from bnfold.package_format import SCHEMA_VERSION

    manifest = model_dir / "1" / "manifest.json"
    if not manifest.is_file() or [path.name for path in model_dir.iterdir()] != ["1"]:
        return False
    return json.loads(manifest.read_text()).get("schema_version") == SCHEMA_VERSION


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four built-in digits models, converted: models/repository when it holds exactly
    version 1 of each in the current package schema, else built once into a temporary
    directory (needs the converter, i.e. torch)."""
    from bnfold.models import DEFAULT_REPOSITORY

    if all(_current_single_version(DEFAULT_REPOSITORY / name) for name in DIGITS_MODELS):
        return DEFAULT_REPOSITORY
    try:
        from bnfold.convert.repository_build import build_default_repository
    except ImportError as exc:
        pytest.skip(f"the converter is not available to build the digits models: {exc}")
    repository = tmp_path_factory.mktemp("digits") / "repository"
    build_default_repository(repository, names=list(DIGITS_MODELS))
    return repository


@pytest.fixture(scope="session")
def digits_service(digits_repository: Path) -> Iterator[RunningServer]:
    with running_server(Settings(repository=digits_repository, device="cpu")) as server:
        yield server


# ---------------------------------------------------------------- gRPC fixtures


@pytest.fixture(scope="session")
def grpc_repository(service_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The service test packages plus `lookup` (INT64 in) and `slow` (a run whose length
    the batch size sets, tests/reliability/packages.py); read-only for tests."""
    from reliability.packages import write_slow

    from service_packages import copy_repository, write_lookup

    repository = copy_repository(service_repository, tmp_path_factory.mktemp("grpc") / "repo")
    write_lookup(repository)
    write_slow(repository)
    return repository


@pytest.fixture(scope="session")
def grpc_service(grpc_repository: Path) -> Iterator[RunningServer]:
    """One server with REST and gRPC for the read-only gRPC tests, admin token set."""
    settings = grpc_settings(grpc_repository, admin_token=ADMIN_TOKEN)
    with running_server(settings) as server:
        yield server
