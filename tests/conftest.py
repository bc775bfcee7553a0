"""Shared fixtures. Each block below belongs to the part of bnfold named in its heading."""

from __future__ import annotations

import json
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
