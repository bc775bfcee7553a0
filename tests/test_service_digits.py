"""The service on the real built-in digits packages (converted from torch by `bnfold models build`).

Inputs are held-out digits from `bnfold.models.digits_dataset`. These tests need
the packages: models/repository when it is built, otherwise the converter
builds them once per session (see the `digits_repository` fixture).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from service_server import RunningServer

DIGITS_MODELS = ("digits_mlp", "digits_resnet", "digits_mobilenet", "digits_conv1d")
BATCH = 64


@pytest.fixture(scope="module")
def client(digits_service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=digits_service.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    from bnfold.models import digits_dataset

    split = digits_dataset()
    return split.test_inputs, split.test_labels


def _request(client: httpx.Client, model: str, pixels: np.ndarray) -> dict:
    """`pixels` (N, 64) in the model's input shape, as its metadata declares it."""
    [tensor] = client.get(f"/v2/models/{model}").json()["inputs"]
    shape = [len(pixels), *tensor["shape"][1:]]
    return {
        "inputs": [
            {
                "name": tensor["name"],
                "shape": shape,
                "datatype": "FP32",
                "data": pixels.reshape(shape).tolist(),
            }
        ]
    }


def _compare(client: httpx.Client, model: str, pixels: np.ndarray) -> dict:
    response = client.post(f"/v2/models/{model}/compare", json=_request(client, model, pixels))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", DIGITS_MODELS)
def test_served_models_classify_the_held_out_digits(
    client: httpx.Client, digits: tuple[np.ndarray, np.ndarray], model: str
) -> None:
    pixels, labels = digits
    response = client.post(f"/v2/models/{model}/infer", json=_request(client, model, pixels))
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    logits = np.asarray(output["data"]).reshape(output["shape"])
    # The recipes reach > 0.9 test accuracy; a broken fold or layout lands near 0.1.
    assert (logits.argmax(axis=1) == labels).mean() > 0.85


@pytest.mark.parametrize("model", DIGITS_MODELS)
def test_train_and_eval_differ_and_drift_grows_off_distribution(
    client: httpx.Client, digits: tuple[np.ndarray, np.ndarray], model: str
) -> None:
    pixels = digits[0][:BATCH]
    metadata = client.get(f"/v2/models/{model}").json()
    base = _compare(client, model, pixels)
    assert base["batch_size"] == BATCH
    [output] = base["outputs"]
    # Batch statistics of 64 digits are not the running ones: visibly different outputs.
    assert output["max_abs_diff"] > 1e-3 and output["relative_l2_diff"] > 1e-3
    assert 0.0 < output["cosine_similarity"] < 1.0
    assert 0.0 <= output["argmax_agreement"] <= 1.0
    layers = base["batchnorm"]
    assert sorted(layer["name"] for layer in layers) == sorted(
        metadata["parameters"]["batchnorm_layers"]
    )
    kl = [layer["kl_divergence"]["mean"] for layer in layers]
    assert kl == sorted(kl, reverse=True) and all(math.isfinite(value) for value in kl)

    # Pixels live in [0, 1]: doubling them, or adding 0.5, moves the first BN's inputs
    # far from anything seen in training; its drift must grow by a large factor.
    for distorted in (pixels * 2.0, pixels + 0.5):
        report = _compare(client, model, distorted)
        worst = report["batchnorm"][0]
        # the first BatchNorm sees the distortion first; later ones see normalised inputs
        assert worst["name"] == metadata["parameters"]["batchnorm_layers"][0]
        assert worst["kl_divergence"]["mean"] > 5 * kl[0]
        assert report["outputs"][0]["relative_l2_diff"] > output["relative_l2_diff"]


def test_batch_of_one_explains_itself_for_batchnorm1d(
    client: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    one = digits[0][:1]
    flat = client.post("/v2/models/digits_mlp/compare", json=_request(client, "digits_mlp", one))
    assert flat.status_code == 422
    assert "batch of at least 2" in flat.json()["error"]
    spatial = client.post(
        "/v2/models/digits_resnet/compare", json=_request(client, "digits_resnet", one)
    )
    assert spatial.status_code == 200, spatial.text
