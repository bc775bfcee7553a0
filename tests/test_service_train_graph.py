"""train.onnx on demand: opened, checked and warmed at load, released, and reopened by
the first compare from the package directory, hash-checked against the loaded manifest.

Real servers on the torch-free MLP package; the expected outputs come from the test
MLP's numpy reference (tests/service_packages.py), not from the server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from bnfold.service import sessions
from bnfold.service.errors import PackageError
from bnfold.service.registry import ModelRegistry
from bnfold.service.sessions import LoadedModel, SessionConfig, TrainGraph
from bnfold.service.settings import Settings

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights, write_mlp
from service_server import RunningServer, running_server

SEED = MLP_SEEDS[1]


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    write_mlp(tmp_path / "repository", "mlp", 1, SEED)
    return tmp_path / "repository"


def _model(server: RunningServer) -> LoadedModel:
    return server.app.state.dataplane.registry.get("mlp", "1")


def _batch(rows: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)


def _body(batch: np.ndarray) -> dict:
    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": batch.ravel().tolist()}], "return_outputs": True}


def _train_output(report: dict) -> np.ndarray:
    [tensor] = report["train_outputs"]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def test_first_compare_reopens_the_released_graph_once_and_keeps_it(repository: Path) -> None:
    batch = _batch()
    reference = mlp_reference(mlp_weights(SEED), batch)["train"]
    with running_server(Settings(repository=repository, device="cpu")) as server:
        train = _model(server).train
        assert (train.resident, train.reopened) == (False, 0)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with ThreadPoolExecutor(4) as pool:
                responses = list(
                    pool.map(
                        lambda _: client.post("/v2/models/mlp/compare", json=_body(batch)), range(4)
                    )
                )
            for response in responses:
                assert response.status_code == 200, response.text
                np.testing.assert_allclose(_train_output(response.json()), reference, atol=1e-4)
            assert (train.resident, train.reopened) == (True, 1)
            again = client.post("/v2/models/mlp/compare", json=_body(batch))
            assert again.status_code == 200
        assert train.reopened == 1


def test_resident_setting_keeps_the_load_session(repository: Path) -> None:
    settings = Settings(repository=repository, device="cpu", resident_train_graph=True)
    with running_server(settings) as server:
        train = _model(server).train
        assert train.resident
        with httpx.Client(base_url=server.url, timeout=30) as client:
            response = client.post("/v2/models/mlp/compare", json=_body(_batch()))
        assert response.status_code == 200, response.text
        assert train.reopened == 0


def test_a_train_graph_changed_after_load_is_refused_and_inference_goes_on(
    repository: Path,
) -> None:
    package = repository / "mlp" / "1"
    original = package / "train.onnx"
    kept = package.parent / "train.onnx.kept"
    shutil.copyfile(original, kept)
    batch = _batch(4)
    expected_eval = mlp_reference(mlp_weights(SEED), batch)["eval"]
    with running_server(Settings(repository=repository, device="cpu")) as server:
        with original.open("ab") as handle:
            handle.write(b"\0")  # the bytes no longer match the manifest the server loaded
        with httpx.Client(base_url=server.url, timeout=30) as client:
            refused = client.post("/v2/models/mlp/compare", json=_body(batch))
            assert refused.status_code == 503
            error = refused.json()["error"]
            assert "train.onnx" in error and "sha256" in error and "mlp version 1" in error
            assert str(repository) not in error

            infer = client.post("/v2/models/mlp/infer", json=_body(batch))
            assert infer.status_code == 200, infer.text
            [output] = infer.json()["outputs"]
            np.testing.assert_allclose(
                np.asarray(output["data"]).reshape(output["shape"]), expected_eval, atol=1e-4
            )

            shutil.copyfile(kept, original)  # put right: a compare after the retry interval
            time.sleep(TrainGraph.REOPEN_RETRY_SECONDS)  # reopens it
            restored = client.post("/v2/models/mlp/compare", json=_body(batch))
            assert restored.status_code == 200, restored.text
        assert _model(server).train.reopened == 1


def test_a_removed_train_graph_is_refused_with_its_name(repository: Path) -> None:
    with running_server(Settings(repository=repository, device="cpu")) as server:
        (repository / "mlp" / "1" / "train.onnx").unlink()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            refused = client.post("/v2/models/mlp/compare", json=_body(_batch(4)))
        assert refused.status_code == 503
        assert "train.onnx is listed in manifest.json but missing" in refused.json()["error"]


def _externalise_together(package: Path, graph_file: str, names: list[str], data_file: str) -> None:
    """Move the initializers `names` of `graph_file` into one data file, one after another,
    as the converter writes a large model; the manifest then lists every file's sha256."""
    model = onnx.load(str(package / graph_file))
    data = bytearray()
    for tensor in model.graph.initializer:
        if tensor.name not in names:
            continue
        raw = onnx.numpy_helper.to_array(tensor).tobytes()
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entries = (("location", data_file), ("offset", str(len(data))), ("length", str(len(raw))))
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        data += raw
    (package / graph_file).write_bytes(model.SerializeToString())
    (package / data_file).write_bytes(bytes(data))
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"] = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(package.iterdir())
        if path.name != "manifest.json"
    }
    (package / "manifest.json").write_text(json.dumps(manifest))


def test_a_reopen_reads_and_hashes_each_file_once(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """External data shared by several tensors is read once per reopen, not once a tensor."""
    _externalise_together(repository / "mlp" / "1", "train.onnx", ["w1", "w2"], "train.onnx.data")
    registry = ModelRegistry(repository, SessionConfig(providers=("CPUExecutionProvider",)))
    registry.load_all()
    model = registry.get("mlp")
    model.train.release()  # as the server does after the load's warm-up
    reads: list[str] = []
    read_verified_file = sessions.read_verified_file

    def counted(location: object, manifest: object, file_name: str) -> bytes:
        reads.append(file_name)
        return read_verified_file(location, manifest, file_name)  # type: ignore[arg-type]

    monkeypatch.setattr(sessions, "read_verified_file", counted)
    batch = _batch(16)
    [output, *_] = model.train_session.run(None, {"input": batch})
    np.testing.assert_allclose(output, mlp_reference(mlp_weights(SEED), batch)["train"], atol=1e-4)
    assert sorted(reads) == ["train.onnx", "train.onnx.data"]


def test_a_failed_reopen_is_remembered_briefly(repository: Path) -> None:
    """Compares right after a failed reopen get its error without reading again."""
    registry = ModelRegistry(repository, SessionConfig(providers=("CPUExecutionProvider",)))
    registry.load_all()
    train = registry.get("mlp").train
    train.release()
    graph = repository / "mlp" / "1" / "train.onnx"
    kept = graph.read_bytes()
    graph.write_bytes(kept + b"\0")
    with pytest.raises(PackageError) as first:
        train.session()
    graph.write_bytes(kept)  # mended, but within the retry interval nothing is read
    with pytest.raises(PackageError) as second:
        train.session()
    assert second.value is first.value
    time.sleep(train.REOPEN_RETRY_SECONDS)
    assert train.session() is not None and train.reopened == 1
