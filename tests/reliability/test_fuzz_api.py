"""The API fuzzed from its own OpenAPI document, and its admin state driven by a state machine.

schemathesis reads /openapi.json from a running server and generates requests
for every operation, valid and invalid (positive and negative modes), with the
repository's model names and versions mixed into the generated ones so the
requests get past the 404s. Checks: no 5xx, no hang (a 10 s timeout per call),
status codes, content types, headers and bodies as documented, and invalid
requests refused. One check is left out, `positive_data_acceptance`: a body that
fits the schema may still not fit the model (a shape, a name), which no JSON
schema of a generic protocol can express, so a 4xx for it is right.

The admin endpoints (load, unload) change what the server serves, so they are
fuzzed without a token here (401 every time) and driven with one by a hypothesis
state machine below, which also breaks and repairs a package on disk between
steps: after every step the server must agree with a model of what it should
serve.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from schemathesis.specs.openapi.checks import positive_data_acceptance

from bnfold.service.rest.app import create_app
from bnfold.service.settings import Settings

from .packages import SERVING
from service_packages import MLP_SEEDS, copy_repository, mlp_reference, mlp_weights
from service_server import ADMIN_TOKEN, RunningServer, running_server

CALL_TIMEOUT_SECONDS = 10
# Serving models and an unknown one. A broken package's 503 is the documented answer
# (test_faults.py), but schemathesis counts every 5xx as a server error.
NAMES = [*SERVING, "no_such_model"]
VERSIONS = ["1", "2", "3"]


def _document() -> dict[str, Any]:
    """The OpenAPI document the server serves (test_the_served_document_is_the_fuzzed_one).

    Built from the app, not fetched: the schema must exist when pytest collects
    the tests, before any server runs (schemathesis' lazy fixture loader does
    not work with pytest 9).
    """
    return create_app(Settings(repository=Path("unused"), device="cpu")).openapi()


schema = schemathesis.openapi.from_dict(_document())
# compare's .npy and .npz bodies are bytes, as the binary tensor form is: fuzzed as such
for _array_type in ("application/x-npy", "application/x-npz"):
    schemathesis.serializer.alias(_array_type, "application/octet-stream")


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Half the time a real model name (and version): otherwise every call is a 404."""
    if not path_parameters or "model_name" not in path_parameters:
        return st.just(path_parameters)
    real = {"model_name": st.sampled_from(NAMES)}
    if "model_version" in path_parameters:
        real["model_version"] = st.sampled_from(VERSIONS)
    return st.one_of(st.just(path_parameters), st.fixed_dictionaries(real))


def test_the_served_document_is_the_fuzzed_one(client: httpx.Client) -> None:
    assert client.get("/openapi.json").json() == _document()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_fuzzing(case: schemathesis.Case, reliability_service: RunningServer) -> None:
    case.call_and_validate(
        base_url=reliability_service.url,
        excluded_checks=[positive_data_acceptance],
        timeout=CALL_TIMEOUT_SECONDS,
    )


# ---------------------------------------------------------------- stateful admin


@pytest.fixture(scope="module")
def admin_repository(
    reliability_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return copy_repository(reliability_repository, tmp_path_factory.mktemp("admin") / "repository")


@pytest.fixture(scope="module")
def admin_server(admin_repository: Path) -> Iterator[RunningServer]:
    settings_ = Settings(repository=admin_repository, device="cpu", admin_token=ADMIN_TOKEN)
    with running_server(settings_) as server:
        yield server


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BATCH = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)


def _expected_mlp(version: int) -> np.ndarray:
    return mlp_reference(mlp_weights(MLP_SEEDS[version]), BATCH)["eval"]


class AdminMachine(RuleBasedStateMachine):
    """mlp (versions 1 and 2) loaded, unloaded, reloaded, its version 2 broken and repaired.

    The model: `loaded` (the last admin call was a load, not an unload) and
    `broken` (version 2's model.onnx is damaged on disk). What the server must
    serve follows: nothing when unloaded; after a load, version 2 when it is
    intact, else version 1 (version 2 listed UNAVAILABLE with its reason).
    A damage or repair on disk changes nothing until the next load.
    """

    client: httpx.Client
    repository: Path

    @initialize()
    def start_loaded(self) -> None:
        self.restore()
        assert self.client.post("/v2/repository/models/mlp/load", headers=ADMIN).status_code == 200
        self.loaded, self.broken, self.served_broken = True, False, False

    def restore(self) -> None:
        package = self.repository / "mlp" / "2"
        backup = self.repository.parent / "mlp-2-model.onnx"
        if not backup.exists():
            shutil.copy(package / "model.onnx", backup)
        shutil.copy(backup, package / "model.onnx")

    @rule()
    def unload(self) -> None:
        response = self.client.post("/v2/repository/models/mlp/unload", headers=ADMIN)
        assert response.status_code == 200, response.text
        self.loaded = False

    @rule()
    def load(self) -> None:
        response = self.client.post("/v2/repository/models/mlp/load", headers=ADMIN)
        assert response.status_code == 200, response.text  # version 1 always loads
        self.loaded, self.served_broken = True, self.broken

    @rule()
    @precondition(lambda self: not self.broken)
    def damage_version_2(self) -> None:
        with (self.repository / "mlp" / "2" / "model.onnx").open("ab") as handle:
            handle.write(b"\0")
        self.broken = True

    @rule()
    @precondition(lambda self: self.broken)
    def repair_version_2(self) -> None:
        self.restore()
        self.broken = False

    @rule(
        token=st.sampled_from(
            ["", "Bearer", "Bearer wrong", f"Basic {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}x"]
        )
    )
    def refused_without_the_token(self, token: str) -> None:
        headers = {"Authorization": token} if token else {}
        for action in ("load", "unload"):
            response = self.client.post(f"/v2/repository/models/mlp/{action}", headers=headers)
            assert response.status_code == 401, response.text

    @invariant()
    def serves_what_the_model_says(self) -> None:
        body = {"inputs": [{"name": "input", "shape": [3, 8], "datatype": "FP32",
                            "data": BATCH.tolist()}]}  # fmt: skip
        response = self.client.post("/v2/models/mlp/infer", json=body)
        index = {
            entry["version"]: entry
            for entry in self.client.post("/v2/repository/index", json={}).json()
            if entry["name"] == "mlp"
        }
        if not self.loaded:
            assert response.status_code == 503, response.text
            assert "unloaded by an admin request" in response.json()["error"]
            assert {entry["state"] for entry in index.values()} == {"UNAVAILABLE"}
            return
        assert response.status_code == 200, response.text
        version = 1 if self.served_broken else 2
        assert response.json()["model_version"] == str(version)
        served = np.asarray(response.json()["outputs"][0]["data"]).reshape(3, 4)
        reference = _expected_mlp(version)
        # float32 Gemms against a float64 reference: 32 ulps of the output scale
        tolerance = 32 * np.finfo(np.float32).eps * np.abs(reference).max()
        assert np.abs(served - reference).max() <= tolerance
        assert index["1"]["state"] == "READY"
        if self.served_broken:
            assert index["2"]["state"] == "UNAVAILABLE"
            assert "sha256 of model.onnx" in index["2"]["reason"]
        else:
            assert index["2"]["state"] == "READY"


def test_admin_state_machine(admin_server: RunningServer, admin_repository: Path) -> None:
    with httpx.Client(base_url=admin_server.url, timeout=CALL_TIMEOUT_SECONDS) as client:
        AdminMachine.client = client
        AdminMachine.repository = admin_repository
        machine = AdminMachine.TestCase
        machine.settings = settings(
            max_examples=6,
            stateful_step_count=10,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        machine().runTest()
