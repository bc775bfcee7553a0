"""Shared fixtures. Each block below belongs to the part of bnfold named in its heading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bnfold.service.settings import Settings

from service_packages import build_test_repository
from service_server import RunningServer, admin_server, running_server

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


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four built-in digits models, converted: models/repository when it is complete,
    else built once into a temporary directory (needs the converter, i.e. torch)."""
    from bnfold.models import DEFAULT_REPOSITORY

    if all((DEFAULT_REPOSITORY / name / "1" / "manifest.json").is_file() for name in DIGITS_MODELS):
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
