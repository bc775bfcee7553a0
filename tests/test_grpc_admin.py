"""RepositoryModelLoad / Unload over gRPC with tritonclient.grpc, unchanged: the admin token as
metadata, Triton's `config` override, and one registry shared with REST. Each test has its
own server on its own copy of the repository (loads and unloads change what is served)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service_packages import copy_repository
from service_server import ADMIN_TOKEN, RunningServer, grpc_settings, running_server

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def admin(service_repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    repository = copy_repository(service_repository, tmp_path / "repository")
    with running_server(grpc_settings(repository, admin_token=ADMIN_TOKEN)) as server:
        yield server


@pytest.fixture
def client(admin: RunningServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(admin.grpc_address)
    yield client
    client.close()


def failure(call: object, *args: object, **kwargs: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.status(), caught.value.message()


def test_unload_and_load_with_the_token_for_both_transports(
    admin: RunningServer, client: triton.InferenceServerClient
) -> None:
    client.unload_model("mlp", headers=ADMIN)
    assert not client.is_model_ready("mlp")
    assert httpx.get(f"{admin.url}/v2/models/mlp/ready").status_code != 200
    batch = [
        triton.InferInput("input", [1, 8], "FP32").set_data_from_numpy(np.zeros((1, 8), np.float32))
    ]
    assert failure(client.infer, "mlp", batch)[0] in (
        "StatusCode.NOT_FOUND",
        "StatusCode.UNAVAILABLE",
    )
    client.load_model("mlp", headers=ADMIN)
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "2")
    assert httpx.get(f"{admin.url}/v2/models/mlp/ready").status_code == 200
    assert client.infer("mlp", batch).as_numpy("output").shape == (1, 4)


def test_load_with_a_config_override_shows_in_the_config(
    admin: RunningServer, client: triton.InferenceServerClient
) -> None:
    override = {"max_batch_size": 4, "dynamic_batching": {"max_queue_delay_microseconds": 700}}
    client.load_model("mlp", config=json.dumps(override), headers=ADMIN)
    config = client.get_model_config("mlp").config
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 700
    rest = httpx.get(f"{admin.url}/v2/models/mlp/config").json()
    assert rest["dynamic_batching"]["max_queue_delay_microseconds"] == 700
    # a load without a config drops the override
    client.load_model("mlp", headers=ADMIN)
    assert client.get_model_config("mlp").config.dynamic_batching.max_queue_delay_microseconds == 0


def test_a_config_bnfold_cannot_honour_is_invalid_argument_naming_the_field(
    client: triton.InferenceServerClient,
) -> None:
    before = client.get_model_config("mlp").config
    override = {"instance_group": [{"kind": "KIND_GPU", "count": 2}]}
    status, message = failure(client.load_model, "mlp", config=json.dumps(override), headers=ADMIN)
    assert status == "StatusCode.INVALID_ARGUMENT" and "instance_group" in message
    status, message = failure(client.load_model, "mlp", config="{not json", headers=ADMIN)
    assert status == "StatusCode.INVALID_ARGUMENT" and "not valid JSON" in message
    # refused before anything was loaded: the model is as it was
    assert client.get_model_config("mlp").config == before


def test_model_files_in_the_request_are_refused(client: triton.InferenceServerClient) -> None:
    status, message = failure(
        client.load_model,
        "mlp",
        config=json.dumps({"max_batch_size": 2}),
        files={"file:1/model.onnx": b"\0"},
        headers=ADMIN,
    )
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "packages come from the repository on disk" in message and "file:1/model.onnx" in message


def test_loading_an_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    assert failure(client.load_model, "nope", headers=ADMIN)[0] == "StatusCode.NOT_FOUND"


def test_without_an_admin_token_the_calls_are_off(service_repository: Path) -> None:
    with running_server(grpc_settings(service_repository)) as server:
        client = triton.InferenceServerClient(server.grpc_address)
        status, message = failure(client.unload_model, "mlp", headers=ADMIN)
        assert status == "StatusCode.PERMISSION_DENIED" and "BNFOLD_ADMIN_TOKEN" in message
        assert client.is_model_ready("mlp")
        client.close()
