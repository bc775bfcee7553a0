"""Admin endpoints (load, unload): off without a token, Bearer-protected with one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bnfold.service.settings import Settings

from service_packages import write_mlp
from service_server import ADMIN_TOKEN, RunningServer, running_server

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def admin_service(service_repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of its own on a copy of the repository: these tests change both."""
    repository = shutil.copytree(service_repository, tmp_path / "repository")
    settings = Settings(repository=repository, device="cpu", admin_token=ADMIN_TOKEN)
    with running_server(settings) as server:
        yield server


def _infer(client: httpx.Client) -> httpx.Response:
    batch = np.zeros((2, 8), dtype=np.float32)
    request = {
        "inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": batch.tolist()}]
    }
    return client.post("/v2/models/mlp/infer", json=request)


def test_admin_endpoints_are_off_without_a_token(service_repository: Path) -> None:
    with (
        running_server(Settings(repository=service_repository, device="cpu")) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for action in ("load", "unload"):
            response = client.post(f"/v2/repository/models/mlp/{action}", headers=AUTH)
            assert response.status_code == 403
            assert "BNFOLD_ADMIN_TOKEN" in response.json()["error"]
        assert _infer(client).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dGVzdA=="},
        {"Authorization": "Bearer wrong"},
    ],
)
def test_wrong_or_missing_tokens_are_401(service: RunningServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=service.url) as client:
        response = client.post("/v2/repository/models/mlp/unload", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert set(response.json()) == {"error", "request_id"}
        assert client.get("/v2/models/mlp/ready").status_code == 200


def test_unload_and_load_over_http(admin_service: RunningServer) -> None:
    with httpx.Client(base_url=admin_service.url) as client:
        assert client.post("/v2/repository/models/mlp/unload", headers=AUTH).status_code == 200
        unloaded = _infer(client)
        assert unloaded.status_code == 503 and "unloaded" in unloaded.json()["error"]
        assert client.get("/v2/models/mlp/ready").status_code == 503
        index = client.post("/v2/repository/index").json()
        assert {entry["reason"] for entry in index if entry["name"] == "mlp"} == {
            "unloaded by an admin request"
        }
        assert client.get("/v2/models/pixels/ready").status_code == 200  # others keep serving

        write_mlp(Path(admin_service.app.state.settings.repository), "mlp", 3, seed=5)
        assert client.post("/v2/repository/models/mlp/load", headers=AUTH).status_code == 200
        reloaded = _infer(client)
        assert reloaded.status_code == 200 and reloaded.json()["model_version"] == "3"

        assert client.post("/v2/repository/models/nope/load", headers=AUTH).status_code == 404
        assert client.post("/v2/repository/models/nope/unload", headers=AUTH).status_code == 404
        broken = client.post("/v2/repository/models/broken_hash/load", headers=AUTH)
        assert broken.status_code == 503 and "sha256 of model.onnx" in broken.json()["error"]
        # Triton's model file upload: packages come from the disk only (a `config` override
        # is tests/test_service_load_config.py's)
        uploads = client.post(
            "/v2/repository/models/mlp/load",
            headers=AUTH,
            json={"parameters": {"file:1/model.onnx": "AAAA"}},
        )
        assert uploads.status_code == 400
        assert "repository on disk" in uploads.json()["error"]
        assert "file:1/model.onnx" in uploads.json()["error"]
        for not_an_object in (0, [], "", False, 1, "x"):
            refused = client.post(
                "/v2/repository/models/mlp/load", headers=AUTH, json={"parameters": not_an_object}
            )
            assert refused.status_code == 400, not_an_object
            assert "'parameters' must be a JSON object" in refused.json()["error"]
        for nothing in ({"parameters": None}, {"parameters": {}}, {}):
            assert client.post(
                "/v2/repository/models/mlp/load", headers=AUTH, json=nothing
            ).is_success


def test_load_and_unload_with_tritonclient(admin_service: RunningServer) -> None:
    client = triton.InferenceServerClient(url=admin_service.address)
    try:
        with pytest.raises(InferenceServerException) as denied:
            client.unload_model("mlp")
        assert denied.value.status() == "401"
        client.unload_model("mlp", headers=AUTH)
        assert not client.is_model_ready("mlp")
        client.load_model("mlp", headers=AUTH)
        assert client.is_model_ready("mlp")
        assert client.is_model_ready("mlp", "1")
    finally:
        client.close()
