"""GET /v2/models/{m}[/versions/{v}]/package: the manifest a version was loaded with.

Real servers on 127.0.0.1, real httpx. The report is checked against each
package's manifest.json parsed here with `json` (not the package format's
models); after a recalibration (an .npz body) version 2's report must carry
the provenance, and a manifest changed on disk after loading must not show.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bnfold.models.data import digits_dataset
from bnfold.service.protocol import PackageReportResponse
from bnfold.service.settings import Settings

from service_server import ADMIN_TOKEN, RunningServer, running_server

DIGITS = ("digits_mlp", "digits_resnet", "digits_mobilenet", "digits_conv1d")
#: What the console's Model page shows, each compared with the file.
SHOWN = (
    "batchnorm",
    "verification",
    "inputs",
    "outputs",
    "source",
    "tool_versions",
    "created",
    "recalibrations",
    "files",
    "node_counts",
    "train_outputs",
)


def _on_disk(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


def _report(client: httpx.Client, path: str) -> dict:
    response = client.get(path)
    assert response.status_code == 200, response.text
    PackageReportResponse.model_validate(response.json())
    return response.json()


def _assert_shows(manifest: dict, on_disk: dict) -> None:
    """Every field of the file, as the file has it; only unset defaults may be added."""
    for key, value in on_disk.items():
        assert manifest[key] == value, key
    assert set(manifest) - set(on_disk) <= {"batching", "recalibrations"}


@pytest.fixture(scope="module")
def digits(digits_service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=digits_service.url, timeout=30) as http:
        yield http


@pytest.mark.parametrize("model", DIGITS)
def test_the_report_is_the_manifest_on_disk(
    digits: httpx.Client, digits_repository: Path, model: str
) -> None:
    on_disk = _on_disk(digits_repository / model / "1")
    assert set(SHOWN) <= set(on_disk)
    unversioned = _report(digits, f"/v2/models/{model}/package")
    versioned = _report(digits, f"/v2/models/{model}/versions/1/package")
    assert unversioned == versioned
    assert (unversioned["model_name"], unversioned["model_version"]) == (model, "1")
    _assert_shows(unversioned["manifest"], on_disk)
    folded = unversioned["manifest"]["batchnorm"]["folded"]
    assert folded and all(set(entry) == {"name", "into", "direction"} for entry in folded)


def test_unknown_and_unready_models(service: RunningServer) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        unknown = client.get("/v2/models/digitz/package")
        no_version = client.get("/v2/models/mlp/versions/7/package")
        not_a_version = client.get("/v2/models/mlp/versions/latest/package")
        broken = client.get("/v2/models/broken_hash/package")
    for response in (unknown, no_version, not_a_version):
        assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json"
    assert "digitz" in unknown.json()["error"]
    assert "no version '7'" in no_version.json()["error"]
    assert broken.status_code == 503, broken.text
    assert "sha256" in broken.json()["error"]


def test_the_report_is_what_was_loaded_not_the_file_now(
    service_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(service_repository / "pixels", repository / "pixels")
    manifest_file = repository / "pixels" / "1" / "manifest.json"
    loaded = json.loads(manifest_file.read_text())
    with (
        running_server(Settings(repository=repository, device="cpu")) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        manifest_file.write_text(json.dumps({**loaded, "created": "2030-01-01T00:00:00+00:00"}))
        report = _report(client, "/v2/models/pixels/package")
    _assert_shows(report["manifest"], loaded)


def test_a_recalibrated_version_reports_its_provenance(
    digits_repository: Path, tmp_path: Path
) -> None:
    """Recalibrate on an .npz body (a single array of any name, for a one-input model), then
    version 2's report carries the recalibration and version 1's stays as it was."""
    repository = tmp_path / "repository"
    shutil.copytree(digits_repository / "digits_mlp", repository / "digits_mlp")
    data = (digits_dataset().train_inputs[:200] * 0.3).astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, shifted_images=data)
    settings = Settings(repository=repository, device="cpu", admin_token=ADMIN_TOKEN)
    with running_server(settings) as server, httpx.Client(base_url=server.url) as client:
        before = _report(client, "/v2/models/digits_mlp/package")
        response = client.post(
            "/v2/repository/models/digits_mlp/recalibrate?method=batch",
            content=buffer.getvalue(),
            headers={
                "Authorization": f"Bearer {ADMIN_TOKEN}",
                "Content-Type": "application/x-npz",
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        after = _report(client, "/v2/models/digits_mlp/package")
        version_1 = _report(client, "/v2/models/digits_mlp/versions/1/package")
    assert after["model_version"] == "2"
    assert version_1 == before
    on_disk = _on_disk(repository / "digits_mlp" / "2")
    _assert_shows(after["manifest"], on_disk)
    [recalibration] = after["manifest"]["recalibrations"]
    assert recalibration["from_version"] == 1
    assert recalibration["method"] == "batch"
    assert recalibration["samples"] == len(data)
    assert recalibration["data"] == "a .npz request body"
    assert recalibration["data_sha256"] == hashlib.sha256(data.tobytes()).hexdigest()
    assert before["manifest"]["recalibrations"] == []
    new_layers = after["manifest"]["batchnorm"]["layers"]
    old_layers = before["manifest"]["batchnorm"]["layers"]
    assert [layer["name"] for layer in new_layers] == [layer["name"] for layer in old_layers]
    assert new_layers[0]["running_mean"] != old_layers[0]["running_mean"]
    # nothing normalises before the first BN: its new running mean is the mean of its input
    # over the data, as version 1's calibration.onnx measures it (float32 sums over 200
    # rows in either: 64 ulps of the activations' scale)
    session = ort.InferenceSession(
        str(repository / "digits_mlp" / "1" / "calibration.onnx"),
        providers=["CPUExecutionProvider"],
    )
    first = new_layers[0]["name"]
    [input_mean] = session.run([f"{first}.input_mean"], {"input": data})
    np.testing.assert_allclose(
        new_layers[0]["running_mean"],
        input_mean,
        rtol=0,
        atol=64 * np.finfo(np.float32).eps * float(np.abs(input_mean).max()),
    )
