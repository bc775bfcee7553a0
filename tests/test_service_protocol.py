"""Every endpoint's real answer against its response model in service/protocol.py.

The response models are closed: no field the model does not declare, none it
declares missing, no null where the server leaves a field out. So a field the
server adds, drops or renames fails here, instead of the OpenAPI document
(/docs) drifting from what the server sends. The second half shows that the
models catch such drift: real answers, each changed in one place, must fail.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from bnfold.service.protocol import (
    INFERENCE_HEADER,
    CompareResponse,
    ErrorResponse,
    InferenceResponse,
    LiveResponse,
    ModelConfigResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    PackageReportResponse,
    ReadyResponse,
    RepositoryModel,
    ServerMetadataResponse,
)
from bnfold.service.settings import Settings

from service_server import RunningServer, running_server

BATCH = np.random.default_rng(11).normal(size=(4, 8)).astype(np.float32)
IMAGES = np.random.default_rng(12).normal(size=(3, 2, 3, 3)).astype(np.float32)


def _request(batch: np.ndarray, name: str = "input", **fields: object) -> dict[str, Any]:
    tensor = {"name": name, "shape": list(batch.shape), "datatype": "FP32", "data": batch.tolist()}
    return {"inputs": [tensor], **fields}


@dataclass(frozen=True)
class Call:
    """One request and the model its answer must fit."""

    model: Any  # a response model, or list[RepositoryModel] for the index
    method: str
    path: str
    body: dict[str, Any] | bytes | None = None
    status: int = 200


CALLS: dict[str, Call] = {
    "server metadata": Call(ServerMetadataResponse, "GET", "/v2"),
    "live": Call(LiveResponse, "GET", "/v2/health/live"),
    "ready": Call(ReadyResponse, "GET", "/v2/health/ready"),
    "model metadata": Call(ModelMetadataResponse, "GET", "/v2/models/mlp"),
    "version metadata": Call(ModelMetadataResponse, "GET", "/v2/models/mlp/versions/1"),
    "datatypes metadata": Call(ModelMetadataResponse, "GET", "/v2/models/dtypes"),
    "model ready": Call(ModelReadyResponse, "GET", "/v2/models/mlp/ready"),
    "version ready": Call(ModelReadyResponse, "GET", "/v2/models/mlp/versions/1/ready"),
    "model config": Call(ModelConfigResponse, "GET", "/v2/models/mlp/config"),
    "datatypes config": Call(ModelConfigResponse, "GET", "/v2/models/dtypes/versions/1/config"),
    "package": Call(PackageReportResponse, "GET", "/v2/models/mlp/package"),
    "version package": Call(PackageReportResponse, "GET", "/v2/models/pixels/versions/1/package"),
    "index": Call(list[RepositoryModel], "POST", "/v2/repository/index", {}),
    "ready index": Call(list[RepositoryModel], "POST", "/v2/repository/index", {"ready": True}),
    "infer": Call(InferenceResponse, "POST", "/v2/models/mlp/infer", _request(BATCH, id="r-1")),
    "infer without id": Call(
        InferenceResponse, "POST", "/v2/models/mlp/versions/1/infer", _request(BATCH)
    ),
    "compare": Call(CompareResponse, "POST", "/v2/models/mlp/compare", _request(BATCH)),
    "compare with outputs": Call(
        CompareResponse,
        "POST",
        "/v2/models/pixels/compare",
        _request(IMAGES, "image", id="c-1", return_outputs=True),
    ),
    "compare with channels": Call(
        CompareResponse, "POST", "/v2/models/mlp/compare?channels=true", _request(BATCH)
    ),
    "unknown model": Call(ErrorResponse, "GET", "/v2/models/digitz", status=404),
    "unknown route": Call(ErrorResponse, "GET", "/v2/nothing", status=404),
    "wrong method": Call(ErrorResponse, "DELETE", "/v2", status=405),
    "malformed body": Call(ErrorResponse, "POST", "/v2/models/mlp/infer", b"{", status=400),
    "tensor does not fit": Call(
        ErrorResponse, "POST", "/v2/models/mlp/infer", _request(BATCH[:, :5]), status=422
    ),
    "compare batch of one": Call(
        ErrorResponse, "POST", "/v2/models/mlp/compare", _request(BATCH[:1]), status=422
    ),
    "broken package": Call(
        ErrorResponse, "POST", "/v2/models/broken_hash/infer", _request(BATCH), status=503
    ),
    "admin without token": Call(
        ErrorResponse, "POST", "/v2/repository/models/mlp/load", status=401
    ),
}


def _send(client: httpx.Client, call: Call) -> httpx.Response:
    if isinstance(call.body, bytes):
        return client.request(call.method, call.path, content=call.body)
    return client.request(call.method, call.path, json=call.body)


def _validate(model: Any, body: Any) -> Any:
    return TypeAdapter(model).validate_python(body)


@pytest.fixture(scope="module")
def client(service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def answers(client: httpx.Client) -> dict[str, Any]:
    """Every call's JSON answer, asked once; each with the status its call expects."""
    bodies = {}
    for name, call in CALLS.items():
        response = _send(client, call)
        assert response.status_code == call.status, (name, response.text)
        assert response.headers["content-type"].startswith("application/json"), name
        bodies[name] = response.json()
    return bodies


@pytest.mark.parametrize("name", list(CALLS))
def test_every_answer_fits_its_model(answers: dict[str, Any], name: str) -> None:
    _validate(CALLS[name].model, answers[name])


def test_the_answers_cover_the_optional_fields(answers: dict[str, Any]) -> None:
    """The calls above reach both sides of every field the server may leave out."""
    assert "bnfold_compare" in answers["server metadata"]["extensions"]
    assert answers["model metadata"]["parameters"]["batching"]["enabled"] is True
    assert "dynamic_batching" in answers["model config"]
    assert answers["infer"]["id"] == "r-1" and "id" not in answers["infer without id"]
    assert {"id", "eval_outputs", "train_outputs"}.isdisjoint(answers["compare"])
    assert {"id", "eval_outputs", "train_outputs"} <= set(answers["compare with outputs"])
    assert "channel_statistics" not in answers["compare"]["batchnorm"][0]
    assert "channel_statistics" in answers["compare with channels"]["batchnorm"][0]
    assert {entry["state"] for entry in answers["index"]} == {"READY", "UNAVAILABLE"}


def test_binary_outputs_header_fits_the_model(client: httpx.Client) -> None:
    """With binary outputs the JSON header alone is the InferenceResponse."""
    request = _request(BATCH, outputs=[{"name": "output", "parameters": {"binary_data": True}}])
    response = client.post("/v2/models/mlp/infer", json=request)
    assert response.status_code == 200, response.text
    header = orjson.loads(response.content[: int(response.headers[INFERENCE_HEADER])])
    [output] = InferenceResponse.model_validate(header).outputs
    assert output.model_dump() == {
        "name": "output",
        "datatype": "FP32",
        "shape": [4, 4],
        "parameters": {"binary_data_size": 4 * 4 * 4},
    }


@pytest.fixture(scope="module")
def unbatched(service_repository: Path) -> Iterator[httpx.Client]:
    """A server whose models do not batch: batching off by the server's default."""
    settings = Settings(repository=service_repository, device="cpu", max_batch_size=1)
    with running_server(settings) as server, httpx.Client(base_url=server.url) as http:
        yield http


def test_a_model_that_does_not_batch(unbatched: httpx.Client) -> None:
    """Metadata names the reason; the config has no `dynamic_batching` block."""
    metadata = ModelMetadataResponse.model_validate(unbatched.get("/v2/models/mlp").json())
    assert metadata.parameters["batching"] == {
        "enabled": False,
        "max_batch_size": 1,
        "max_queue_delay_us": 0,
        "max_queue_size": 256,
        "disabled_reason": "max_batch_size is 1",
    }
    config = unbatched.get("/v2/models/mlp/config").json()
    assert ModelConfigResponse.model_validate(config).dynamic_batching is None
    assert "dynamic_batching" not in config


# ---------------------------------------------------------------- drift is caught

_DROP = object()


def _changed(body: Any, path: tuple[str | int, ...], value: object) -> Any:
    """A copy of `body` with the value at `path` set to `value`, or removed for `_DROP`."""
    changed = copy.deepcopy(body)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    if value is _DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("server metadata", ("uptime_seconds",), 12.5),
        ("model metadata", ("parameters", "input_rank"), 2),
        ("model metadata", ("parameters", "batching", "preferred_batch_size"), [4]),
        ("model metadata", ("parameters", "batching"), _DROP),
        ("model metadata", ("inputs", 0, "datatype"), "FLOAT32"),
        ("model metadata", ("parameters", "batching", "disabled_reason"), None),
        ("model ready", ("version",), "2"),
        ("model config", ("instance_group", 0, "gpus"), [0]),
        ("model config", ("input", 0, "data_type"), "FP32"),
        ("model config", ("parameters", "execution_providers"), "CPUExecutionProvider"),
        ("model config", ("dynamic_batching",), None),
        ("index", (0, "loaded_at"), "2024-01-01T00:00:00Z"),
        ("infer", ("id",), None),
        ("infer", ("parameters",), {}),
        ("infer", ("outputs", 0, "parameters"), {"binary_data_size": 64}),
        ("infer", ("outputs", 0, "data"), _DROP),
        ("compare", ("id",), None),
        ("compare", ("outputs", 0, "argmax_agreement"), _DROP),
        ("compare", ("outputs", 0, "datatype"), "FP32"),
        ("compare", ("batchnorm", 0, "kl_divergence", "median"), 0.5),
        ("compare", ("batchnorm", 0, "running_mean"), [0.0]),
        ("compare", ("eval_outputs",), None),
        ("compare with outputs", ("train_outputs", 0, "parameters"), {"binary_data_size": 72}),
        ("compare with channels", ("batchnorm", 0, "channel_statistics", "var_ratio"), [1.0]),
        ("compare with channels", ("batchnorm", 0, "channel_statistics", "mean"), _DROP),
        ("package", ("manifest_path",), "mlp/1/manifest.json"),
        ("package", ("manifest",), _DROP),
        ("package", ("model_version",), 1),
        ("unknown model", ("code",), 404),
    ],
)
def test_a_drift_from_the_model_fails_validation(
    answers: dict[str, Any], name: str, path: tuple[str | int, ...], value: object
) -> None:
    """One field added, dropped, renamed or null where the server leaves it out: refused."""
    model = CALLS[name].model
    _validate(model, answers[name])
    with pytest.raises(ValidationError):
        _validate(model, _changed(answers[name], path, value))
