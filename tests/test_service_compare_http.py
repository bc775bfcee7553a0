"""POST .../compare on the torch-free test packages, checked against a numpy reference.

The test MLP's running statistics are the exact moments of its hidden layer for
standard-normal inputs (tests/service_packages.py), so a large N(0, 1) batch
agrees with them and a shifted or scaled batch does not.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest

from bnfold.package_format import ManifestLayer
from bnfold.service.compare import compare_output, layer_drift
from bnfold.service.protocol import CompareResponse

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights
from service_server import RunningServer

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def client(service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=10) as http:
        yield http


def _request(batch: np.ndarray, name: str = "input", **fields: object) -> dict:
    return {
        "inputs": [
            {"name": name, "shape": list(batch.shape), "datatype": "FP32", "data": batch.tolist()}
        ],
        **fields,
    }


def _binary_request(batch: np.ndarray, **fields: object) -> tuple[bytes, dict[str, str]]:
    """`batch` as binary data of `input` after the JSON header: (body, headers)."""
    tensor = {
        "name": "input",
        "shape": list(batch.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": batch.nbytes},
    }
    header = orjson.dumps({"inputs": [tensor], **fields})
    return header + batch.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _compare(
    client: httpx.Client, batch: np.ndarray, path: str = "/v2/models/mlp/compare", **fields: object
) -> dict:
    response = client.post(path, json=_request(batch, **fields))
    assert response.status_code == 200, response.text
    return CompareResponse.model_validate(response.json()).model_dump(exclude_none=True)


def _normal_batch(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(size, 8)).astype(np.float32)


def test_report_matches_the_numpy_reference(client: httpx.Client) -> None:
    batch = _normal_batch(32)
    report = _compare(client, batch, path="/v2/models/mlp/versions/1/compare", id="cmp-1")
    assert (report["model_version"], report["id"], report["batch_size"]) == ("1", "cmp-1", 32)
    weights = mlp_weights(MLP_SEEDS[1])
    reference = mlp_reference(weights, batch)

    [output] = report["outputs"]
    expected = compare_output("output", reference["eval"], reference["train"])
    # onnxruntime computes in float32: each side is within ~32 ulps of the output
    # scale of the float64 reference, so differences agree to twice that.
    scale = float(np.abs(reference["train"]).max())
    for key in ("max_abs_diff", "mean_abs_diff"):
        assert output[key] == pytest.approx(expected[key], abs=64 * FLOAT32_EPS * scale)
    for key in ("relative_l2_diff", "cosine_similarity", "argmax_agreement"):
        assert output[key] == pytest.approx(expected[key], rel=1e-4)
    assert output["max_abs_diff"] > 0.1  # N=32 statistics differ visibly from the running ones

    [layer] = report["batchnorm"]
    manifest_layer = ManifestLayer(
        name="bn1",
        channels=16,
        eps=1e-5,
        input_rank=2,
        running_mean=weights.running_mean.tolist(),
        running_var=weights.running_var.tolist(),
        batch_mean_output="bn1.batch_mean",
        batch_var_output="bn1.batch_var",
    )
    expected_drift = layer_drift(manifest_layer, reference["batch_mean"], reference["batch_var"])
    # float32 batch statistics over 32 samples: relative error ~1e-6; 1e-4 leaves margin.
    for key in ("mean_shift", "var_ratio", "kl_divergence"):
        for statistic in ("mean", "max"):
            assert layer[key][statistic] == pytest.approx(
                expected_drift[key][statistic], rel=1e-4, abs=1e-6
            )


def _worst_kl(report: dict) -> float:
    return report["batchnorm"][0]["kl_divergence"]["mean"]


def test_drift_grows_when_the_batch_is_shifted_or_scaled(client: httpx.Client) -> None:
    batch = _normal_batch(512, seed=3)
    matching = _compare(client, batch)
    shifted = _compare(client, batch + 1.0)
    scaled = _compare(client, batch * 3.0)
    # 512 standard-normal samples: sampling error of the 16 channel moments keeps
    # KL small (~1/N per channel); a unit shift or 3x scale makes it O(1).
    assert _worst_kl(matching) < 0.02
    assert matching["batchnorm"][0]["mean_shift"]["max"] < 0.2
    assert _worst_kl(shifted) > 25 * _worst_kl(matching)
    assert shifted["batchnorm"][0]["mean_shift"]["max"] > 1.0
    assert _worst_kl(scaled) > 25 * _worst_kl(matching)
    assert scaled["batchnorm"][0]["var_ratio"]["mean"] > 5.0
    for drifted in (shifted, scaled):
        assert (
            drifted["outputs"][0]["relative_l2_diff"] > matching["outputs"][0]["relative_l2_diff"]
        )


def test_batch_of_one_has_no_statistics_for_batchnorm1d(client: httpx.Client) -> None:
    response = client.post("/v2/models/mlp/compare", json=_request(_normal_batch(1)))
    assert response.status_code == 422
    message = response.json()["error"]
    assert "batch of at least 2" in message and "bn1" in message and "no variance" in message


def test_batch_of_one_is_fine_with_spatial_statistics(client: httpx.Client) -> None:
    image = np.random.default_rng(4).normal(size=(1, 2, 3, 3)).astype(np.float32)
    report = _compare(client, image, path="/v2/models/pixels/compare", name="image")
    assert report["batch_size"] == 1 and report["batchnorm"][0]["name"] == "bn"
    constant = client.post(
        "/v2/models/pixels/compare", json=_request(np.ones((1, 2, 3, 3), np.float32), name="image")
    )
    assert constant.status_code == 422 and "zero variance" in constant.json()["error"]


def test_non_finite_inputs_are_refused(client: httpx.Client) -> None:
    batch = _normal_batch(4)
    batch[1, 2] = np.nan
    content, headers = _binary_request(batch)
    response = client.post("/v2/models/mlp/compare", content=content, headers=headers)
    assert response.status_code == 422 and "NaN" in response.json()["error"]


def test_return_outputs_gives_both_modes(client: httpx.Client) -> None:
    batch = _normal_batch(6)
    report = _compare(client, batch, return_outputs=True)
    [eval_output] = report["eval_outputs"]
    [train_output] = report["train_outputs"]
    inferred = client.post("/v2/models/mlp/infer", json=_request(batch)).json()["outputs"][0]
    assert eval_output["data"] == inferred["data"]  # the same session on the same batch
    reference = mlp_reference(mlp_weights(MLP_SEEDS[2]), batch)["train"]
    np.testing.assert_allclose(
        np.asarray(train_output["data"], dtype=np.float32).reshape(6, 4),
        reference,
        rtol=0,
        atol=32 * FLOAT32_EPS * float(np.abs(reference).max()),
    )
    assert "eval_outputs" not in _compare(client, batch)


def test_compare_changes_no_state(client: httpx.Client) -> None:
    """Eval results are bit-identical before and after many compares (binary outputs, no rounding)."""
    binary_output = {"name": "output", "parameters": {"binary_data": True}}
    content, headers = _binary_request(_normal_batch(7, seed=11), outputs=[binary_output])

    def eval_bytes() -> bytes:
        response = client.post("/v2/models/mlp/infer", content=content, headers=headers)
        return response.content[int(response.headers["inference-header-content-length"]) :]

    before = eval_bytes()
    reports = [_compare(client, _normal_batch(16, seed) * (1 + seed)) for seed in range(20)]
    assert len({orjson.dumps(report["batchnorm"]) for report in reports}) == 20
    assert eval_bytes() == before
    assert _compare(client, _normal_batch(16, 0)) == reports[0]
