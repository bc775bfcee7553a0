"""POST /v2/repository/models/{m}/recalibrate and the roll forward / roll back around it.

Real servers on 127.0.0.1, real converted digits packages (copied: recalibration writes a
new version into the repository), real httpx clients. What the endpoint writes is checked
against the library run in-process on the same data into another copy of the repository,
and what is served against onnxruntime sessions opened on the written files.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bnfold.convert.recalibration.pipeline import RecalibrationRequest, recalibrate
from bnfold.models.data import digits_dataset
from bnfold.service.errors import Conflict
from bnfold.service.recalibration import RecalibrationOptions, Recalibrations
from bnfold.service.registry import ModelRegistry
from bnfold.service.sessions import SessionConfig
from bnfold.service.settings import Settings

from service_packages import write_mlp
from service_server import ADMIN_TOKEN, running_server

MODEL = "digits_mlp"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NPY = {**ADMIN, "Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def shifted() -> tuple[np.ndarray, np.ndarray]:
    """(unlabeled shifted training images, shifted held-out images): contrast x0.3."""
    digits = digits_dataset()
    return (
        (digits.train_inputs[:300] * 0.3).astype(np.float32),
        (digits.test_inputs[:64] * 0.3).astype(np.float32),
    )


@pytest.fixture
def repository(digits_repository: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    shutil.copytree(digits_repository / MODEL, repository / MODEL)
    return repository


def _settings(repository: Path, **changes: object) -> Settings:
    return Settings(repository=repository, device="cpu", admin_token=ADMIN_TOKEN, **changes)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _infer(client: httpx.Client, batch: np.ndarray, version: str | None = None) -> np.ndarray:
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}]}  # fmt: skip
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def _onnx(package: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch})[0]


def _layers(package: Path) -> dict[str, tuple[list[float], list[float]]]:
    manifest = json.loads((package / "manifest.json").read_text())
    return {
        layer["name"]: (layer["running_mean"], layer["running_var"])
        for layer in manifest["batchnorm"]["layers"]
    }


def test_npy_body_recalibrates_rolls_forward_and_unloading_rolls_back(
    repository: Path, tmp_path: Path, shifted: tuple[np.ndarray, np.ndarray]
) -> None:
    train, test = shifted
    reference_repository = tmp_path / "reference"
    shutil.copytree(repository, reference_repository)
    reference = recalibrate(
        RecalibrationRequest(repository=reference_repository, name=MODEL, data=train)
    )
    with (
        running_server(_settings(repository)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        before = _infer(client, test)
        response = client.post(
            f"/v2/repository/models/{MODEL}/recalibrate", content=_npy(train), headers=NPY
        )
        assert response.status_code == 200, response.text
        report = response.json()
        assert (report["from_version"], report["model_version"]) == ("1", "2")
        assert (report["state"], report["default_version"]) == ("READY", "2")
        recalibration = report["recalibration"]
        assert recalibration["samples"] == len(train)
        assert recalibration["data_sha256"] == reference.data_sha256
        assert recalibration["package_path"] == f"{MODEL}/2"
        assert all(
            layer["after"]["kl_divergence"]["mean"] < 1e-4 for layer in recalibration["layers"]
        )
        assert (
            max(layer["before"]["kl_divergence"]["mean"] for layer in recalibration["layers"]) > 0.1
        )

        new_package = repository / MODEL / "2"
        assert _layers(new_package) == _layers(Path(reference.package_path))
        np.testing.assert_array_equal(_infer(client, test), _onnx(new_package, test))
        np.testing.assert_array_equal(_infer(client, test, "1"), before)

        rollback = client.post(f"/v2/repository/models/{MODEL}/versions/2/unload", headers=ADMIN)
        assert rollback.status_code == 200, rollback.text
        np.testing.assert_array_equal(_infer(client, test), before)
        index = client.post("/v2/repository/index").json()
        assert {(entry["version"], entry["state"]) for entry in index} == {
            ("1", "READY"),
            ("2", "UNAVAILABLE"),
        }


def test_v2_tensor_body_and_options_reach_the_library(
    repository: Path, shifted: tuple[np.ndarray, np.ndarray]
) -> None:
    train, _ = shifted
    body = {
        "inputs": [{"name": "input", "shape": list(train.shape), "datatype": "FP32",
                    "data": train.ravel().tolist()}],
        "parameters": {"method": "batch", "max_samples": 128, "batch_size": 32, "version": 1},
    }  # fmt: skip
    with (
        running_server(_settings(repository)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        response = client.post(
            f"/v2/repository/models/{MODEL}/recalibrate", json=body, headers=ADMIN
        )
    assert response.status_code == 200, response.text
    recalibration = response.json()["recalibration"]
    assert (recalibration["method"], recalibration["samples"], recalibration["batch_size"]) == (
        "batch",
        128,
        32,
    )
    manifest = json.loads((repository / MODEL / "2" / "manifest.json").read_text())
    assert manifest["recalibrations"][-1]["method"] == "batch"
    assert manifest["recalibrations"][-1]["from_version"] == 1


def test_the_reservoir_of_live_inputs_recalibrates(
    repository: Path, shifted: tuple[np.ndarray, np.ndarray]
) -> None:
    _, test = shifted
    settings = _settings(repository, drift_sample_fraction=1.0, drift_reservoir_samples=48)
    with running_server(settings) as server, httpx.Client(base_url=server.url) as client:
        for start in range(0, 64, 8):
            _infer(client, test[start : start + 8])
        assert server.app.state.dataplane.drift.wait_idle(30)
        response = client.post(
            f"/v2/repository/models/{MODEL}/recalibrate",
            json={"parameters": {"source": "reservoir"}},
            headers=ADMIN,
        )
    assert response.status_code == 200, response.text
    recalibration = response.json()["recalibration"]
    assert recalibration["samples"] == 48
    # the most recent 48 rows, in arrival order
    assert recalibration["data_sha256"] == _sha256(test[16:64])


def _sha256(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (lambda t: _npy(t), {"Content-Type": "application/x-npy"}, 401, "Bearer"),
        (lambda t: b"not numpy", NPY, 400, "not a .npy array"),
        (lambda t: _npy(t[:, :10]), NPY, 422, "shape"),
        (lambda t: _npy(np.where(t > 0.1, np.nan, t).astype(np.float32)), NPY, 422, "NaN"),
        (lambda t: _npy(t.astype(np.float64)), NPY, 422, "float64"),
        (lambda t: _npy(t[:1]), NPY, 422, "samples"),
        (lambda t: b'{"parameters": {"source": "reservoir"}}', ADMIN, 409, "reservoir is off"),
        (lambda t: b"{}", ADMIN, 400, "send the calibration inputs"),
        (lambda t: b'{"parameters": {"method": "magic"}, "inputs": []}', ADMIN, 400, "method"),
    ],
)
def test_bad_requests_are_refused_and_write_nothing(
    repository: Path,
    shifted: tuple[np.ndarray, np.ndarray],
    body,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    train, _ = shifted
    with (
        running_server(_settings(repository)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        response = client.post(
            f"/v2/repository/models/{MODEL}/recalibrate", content=body(train), headers=headers
        )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert sorted(path.name for path in (repository / MODEL).iterdir()) == ["1"]


def test_unknown_model_404_schema_1_package_409_admin_off_403(tmp_path: Path) -> None:
    write_mlp(tmp_path, "old", 1, seed=1)
    batch = _npy(np.zeros((4, 8), np.float32))
    with running_server(_settings(tmp_path)) as server, httpx.Client(base_url=server.url) as client:
        missing = client.post("/v2/repository/models/nope/recalibrate", content=batch, headers=NPY)
        old = client.post("/v2/repository/models/old/recalibrate", content=batch, headers=NPY)
    assert missing.status_code == 404, missing.text
    assert old.status_code == 409, old.text
    assert "calibration.onnx" in old.json()["error"]
    settings = Settings(repository=tmp_path, device="cpu")
    with running_server(settings) as server, httpx.Client(base_url=server.url) as client:
        off = client.post("/v2/repository/models/old/recalibrate", content=batch, headers=NPY)
    assert off.status_code == 403, off.text


def test_a_second_recalibration_of_the_same_model_is_refused_while_one_runs(
    repository: Path, shifted: tuple[np.ndarray, np.ndarray]
) -> None:
    train, _ = shifted
    registry = ModelRegistry(repository, SessionConfig(providers=("CPUExecutionProvider",)))
    registry.load_all()
    recalibrations = Recalibrations(registry, threads=1)

    async def both() -> dict:
        first = asyncio.create_task(
            recalibrations.run(MODEL, RecalibrationOptions(), train, "first")
        )
        await asyncio.sleep(0)  # the first has claimed the model
        assert recalibrations.running(MODEL)
        with pytest.raises(Conflict, match="already running"):
            await recalibrations.run(MODEL, RecalibrationOptions(), train, "second")
        return await first

    report = asyncio.run(both())
    assert report["model_version"] == "2"
    assert not recalibrations.running(MODEL)


def test_inference_during_the_roll_forward_never_fails(
    repository: Path, shifted: tuple[np.ndarray, np.ndarray]
) -> None:
    """Unversioned requests racing the recalibration and the switch are all answered, by
    version 1 or version 2, as onnxruntime computes each on its own files."""
    train, test = shifted
    batch = test[:4]
    answers: list[np.ndarray] = []
    failures: list[str] = []
    done = threading.Event()
    with running_server(_settings(repository)) as server:

        def hammer() -> None:
            with httpx.Client(base_url=server.url) as client:
                for _ in range(3000):
                    if done.is_set():
                        return
                    try:
                        answers.append(_infer(client, batch))
                    except AssertionError as exc:
                        failures.append(str(exc))
                        return

        thread = threading.Thread(target=hammer)
        thread.start()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.post(
                f"/v2/repository/models/{MODEL}/recalibrate", content=_npy(train), headers=NPY
            )
            after = _infer(client, batch)
        done.set()
        thread.join(timeout=60)
    assert response.status_code == 200, response.text
    assert failures == []
    old, new = _onnx(repository / MODEL / "1", batch), _onnx(repository / MODEL / "2", batch)
    np.testing.assert_array_equal(after, new)
    for answer in answers:
        assert np.array_equal(answer, old) or np.array_equal(answer, new)
