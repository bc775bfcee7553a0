"""GET .../drift and the drift gauges on a real server, on hand-built schema-2 packages.

The server samples every request (`drift_sample_fraction` 1.0), so after N
requests the window holds exactly their rows: the endpoint's statistics must
equal numpy's on the MLP's hidden pre-activation (x @ w1 + b1, the BN's input)
over every row sent. The test MLP's running statistics are the exact moments
of that layer for standard-normal inputs (tests/service_packages.py), so
N(0, 1) traffic agrees with them and shifted traffic does not.

The monitor measures on its own thread; each test waits until it has measured
what was queued (`DriftMonitor.wait_idle`) before it reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bnfold.bn_statistics import drift_measures
from bnfold.package_format import parse_manifest
from bnfold.service.protocol import DriftResponse
from bnfold.service.settings import Settings

from service_packages import (
    BN_EPS,
    MLP_SEEDS,
    PIXELS_SEED,
    mlp_weights,
    pixels_weights,
    write_mlp,
    write_pixels,
)
from service_server import ADMIN_TOKEN, RunningServer, running_server

FLOAT32_EPS = float(np.finfo(np.float32).eps)
WAIT_SECONDS = 30.0
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def drift_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Schema-2 packages, one model per test so windows never mix; `legacy` is schema 1."""
    repository = tmp_path_factory.mktemp("drift") / "repository"
    for name in ("exact", "identical", "reservoir", "unload"):
        write_mlp(repository, name, 1, MLP_SEEDS[1], calibration=True)
    for version, seed in MLP_SEEDS.items():
        write_mlp(repository, "shifts", version, seed, calibration=True)
    write_pixels(repository, calibration=True)
    write_mlp(repository, "legacy", 1, MLP_SEEDS[1])
    return repository


def _settings(repository: Path, **fields: object) -> Settings:
    return Settings(
        repository=repository,
        device="cpu",
        admin_token=ADMIN_TOKEN,
        drift_sample_fraction=1.0,
        drift_reservoir_samples=10,
        **fields,
    )


@pytest.fixture(scope="module")
def server(drift_repository: Path) -> Iterator[RunningServer]:
    with running_server(_settings(drift_repository)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _json_infer(client: httpx.Client, path: str, batch: np.ndarray, name: str = "input") -> bytes:
    body = {
        "inputs": [
            {"name": name, "shape": list(batch.shape), "datatype": "FP32", "data": batch.tolist()}
        ]
    }
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.content


def _binary_infer(client: httpx.Client, path: str, batch: np.ndarray) -> bytes:
    tensor = {
        "name": "input",
        "shape": list(batch.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": batch.nbytes},
    }
    header = orjson.dumps(
        {"inputs": [tensor], "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}
    )
    response = client.post(
        path,
        content=header + batch.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    return response.content


def _drift(client: httpx.Client, server: RunningServer, path: str) -> dict:
    assert server.app.state.dataplane.drift.wait_idle(WAIT_SECONDS)
    response = client.get(path)
    assert response.status_code == 200, response.text
    return DriftResponse.model_validate(response.json()).model_dump(exclude_none=True)


def _hidden(batch: np.ndarray, seed: int) -> np.ndarray:
    """The BN's input in float64: the first Gemm of the test MLP."""
    weights = mlp_weights(seed)
    return batch.astype(np.float64) @ weights.w1 + weights.b1


def test_the_window_equals_numpy_over_every_request(
    client: httpx.Client, server: RunningServer
) -> None:
    rng = np.random.default_rng(0)
    sent = []
    for index, rows in enumerate([1, 3, 7, 1, 7, 3, 1, 1, 7, 3]):
        batch = rng.normal(0.5, 1.5, (rows, 8)).astype(np.float32)
        send = _json_infer if index % 2 else _binary_infer
        send(client, "/v2/models/exact/infer", batch)
        sent.append(batch)
    report = _drift(client, server, "/v2/models/exact/versions/1/drift?channels=true")

    everything = np.concatenate(sent)
    hidden = _hidden(everything, MLP_SEEDS[1])
    assert report["available"] is True
    assert (report["samples"], report["requests_sampled"], report["dropped"]) == (34, 10, 0)
    assert report["sample_fraction"] == 1.0
    [layer] = report["layers"]
    assert (layer["name"], layer["channels"], layer["values_per_channel"]) == ("bn1", 16, 34)
    channels = layer["channel_statistics"]
    # onnxruntime computes the Gemm and each run's moments in float32: a few ulps of the
    # activations' scale for the mean, of their square for the variance (128 ulps allowed)
    scale = float(np.abs(hidden).max())
    np.testing.assert_allclose(
        channels["mean"], hidden.mean(axis=0), rtol=0, atol=128 * FLOAT32_EPS * scale
    )
    np.testing.assert_allclose(
        channels["var"], hidden.var(axis=0), rtol=0, atol=128 * FLOAT32_EPS * scale**2
    )

    weights = mlp_weights(MLP_SEEDS[1])
    expected = drift_measures(
        weights.running_mean, weights.running_var, BN_EPS, hidden.mean(axis=0), hidden.var(axis=0)
    )
    for key in ("mean_shift", "var_ratio", "kl_divergence"):
        assert layer[key] == pytest.approx(expected[key], rel=1e-4), key
    assert layer["drifted"] == (expected["kl_divergence"]["mean"] > report["kl_threshold"])


def test_spatial_layers_pool_over_the_batch_and_spatial_axes(
    client: httpx.Client, server: RunningServer
) -> None:
    """pixels: a BN on (N, 2, 3, 3) images; one image alone already has 9 values a channel."""
    rng = np.random.default_rng(1)
    images = [rng.normal(1.0, 2.0, (rows, 2, 3, 3)).astype(np.float32) for rows in (1, 3, 1)]
    for image in images:
        _json_infer(client, "/v2/models/pixels/infer", image, name="image")
    report = _drift(client, server, "/v2/models/pixels/drift?channels=true")
    [layer] = report["layers"]
    everything = np.concatenate(images).astype(np.float64)
    assert layer["values_per_channel"] == 5 * 9
    channels = layer["channel_statistics"]
    np.testing.assert_allclose(
        channels["mean"], everything.mean(axis=(0, 2, 3)), rtol=0, atol=128 * FLOAT32_EPS * 10
    )
    np.testing.assert_allclose(
        channels["var"], everything.var(axis=(0, 2, 3)), rtol=0, atol=128 * FLOAT32_EPS * 100
    )
    weights = pixels_weights(PIXELS_SEED)
    expected = drift_measures(
        weights.running_mean,
        weights.running_var,
        BN_EPS,
        everything.mean(axis=(0, 2, 3)),
        everything.var(axis=(0, 2, 3)),
    )
    assert layer["kl_divergence"] == pytest.approx(expected["kl_divergence"], rel=1e-4)


def test_shifted_traffic_drifts_and_in_distribution_traffic_does_not(
    client: httpx.Client, server: RunningServer
) -> None:
    """Version 1 gets N(0, 1) inputs (what its running statistics describe), version 2
    the same inputs scaled by 3 and shifted by 2; unversioned requests hit version 2."""
    rng = np.random.default_rng(2)
    for _ in range(40):
        batch = rng.normal(size=(8, 8)).astype(np.float32)
        _json_infer(client, "/v2/models/shifts/versions/1/infer", batch)
        _json_infer(client, "/v2/models/shifts/infer", 3 * batch + 2)
    calm = _drift(client, server, "/v2/models/shifts/versions/1/drift")
    shifted = _drift(client, server, "/v2/models/shifts/drift")

    assert calm["verdict"] == {"status": "ok", "drifted_layers": 0, "layers": 1}
    assert calm["layers"][0]["kl_divergence"]["mean"] < calm["kl_threshold"]
    assert shifted["model_version"] == "2"
    assert shifted["verdict"] == {"status": "drifted", "drifted_layers": 1, "layers": 1}
    assert shifted["layers"][0]["drifted"] is True
    # a variance 9 times the running one alone is 0.5 (9 - 1 - ln 9) = 2.9 nats
    assert shifted["layers"][0]["kl_divergence"]["mean"] > 2.9
    assert shifted == _drift(client, server, "/v2/models/shifts/versions/2/drift")


def test_too_few_samples_are_insufficient_data(client: httpx.Client, server: RunningServer) -> None:
    """The MLP's BN sees (N, 16): one row is one value per channel, no variance yet."""
    empty = _drift(client, server, "/v2/models/unload/drift")
    assert empty["samples"] == 0
    assert empty["verdict"]["status"] == "insufficient_data"
    assert empty["layers"] == [
        {"name": "bn1", "channels": 16, "values_per_channel": 0, "drifted": False}
    ]


def test_a_schema_1_package_serves_without_drift(
    client: httpx.Client, server: RunningServer
) -> None:
    batch = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    _json_infer(client, "/v2/models/legacy/infer", batch)
    report = _drift(client, server, "/v2/models/legacy/drift")
    assert report["available"] is False
    assert "schema version 1" in report["reason"]
    assert {"samples", "verdict", "layers"}.isdisjoint(report)


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v2/models/nope/drift", 404, "unknown model 'nope'"),
        ("/v2/models/exact/versions/9/drift", 404, "has no version '9'"),
        ("/v2/models/exact/drift?channels=maybe", 400, "query.channels"),
    ],
)
def test_bad_drift_requests(client: httpx.Client, path: str, status: int, message: str) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_the_reservoir_keeps_the_newest_sampled_rows(
    client: httpx.Client, server: RunningServer
) -> None:
    """drift_reservoir_samples 10: after 3 + 7 + 4 rows, the last 10 in order."""
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(rows, 8)).astype(np.float32) for rows in (3, 7, 4)]
    for batch in batches:
        _json_infer(client, "/v2/models/reservoir/infer", batch)
    dataplane = server.app.state.dataplane
    assert dataplane.drift.wait_idle(WAIT_SECONDS)
    kept = dataplane.drift.recent_inputs(dataplane.registry.get("reservoir"))
    np.testing.assert_array_equal(kept["input"], np.concatenate(batches)[-10:])


def _metric_lines(client: httpx.Client, name: str, model: str) -> dict[str, float]:
    pattern = re.compile(rf'^{name}\{{(.*model="{model}".*)\}} (\S+)$')
    found = {}
    for line in client.get("/metrics").text.splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def test_prometheus_has_the_drift_gauges(client: httpx.Client, server: RunningServer) -> None:
    batch = np.random.default_rng(5).normal(size=(6, 8)).astype(np.float32)
    for _ in range(3):
        _json_infer(client, "/v2/models/shifts/versions/1/infer", batch * 4)
    report = _drift(client, server, "/v2/models/shifts/versions/1/drift")
    [layer] = report["layers"]
    labels = 'layer="bn1",model="shifts",version="1"'
    kl = _metric_lines(client, "bnfold_drift_kl_divergence", "shifts")
    shift = _metric_lines(client, "bnfold_drift_mean_shift", "shifts")
    assert kl[labels] == pytest.approx(layer["kl_divergence"]["mean"], rel=1e-12)
    assert shift[labels] == pytest.approx(layer["mean_shift"]["mean"], rel=1e-12)
    samples = _metric_lines(client, "bnfold_drift_window_samples", "shifts")
    assert samples['model="shifts",version="1"'] == report["samples"]
    drifted = _metric_lines(client, "bnfold_drift_drifted_layers", "shifts")
    assert drifted['model="shifts",version="1"'] == report["verdict"]["drifted_layers"]
    dropped = _metric_lines(client, "bnfold_drift_dropped_samples_total", "shifts")
    assert dropped['model="shifts",version="1"'] == 0
    # schema 1: no drift series at all
    assert not _metric_lines(client, "bnfold_drift_window_samples", "legacy")


def test_unloading_a_model_removes_its_series(client: httpx.Client, server: RunningServer) -> None:
    batch = np.random.default_rng(6).normal(size=(4, 8)).astype(np.float32)
    _json_infer(client, "/v2/models/unload/infer", batch)
    _drift(client, server, "/v2/models/unload/drift")
    assert _metric_lines(client, "bnfold_drift_kl_divergence", "unload")
    assert client.post("/v2/repository/models/unload/unload", headers=AUTH).status_code == 200
    for name in ("bnfold_drift_kl_divergence", "bnfold_drift_window_samples"):
        assert not _metric_lines(client, name, "unload"), name
    assert client.post("/v2/repository/models/unload/load", headers=AUTH).status_code == 200
    reloaded = _drift(client, server, "/v2/models/unload/drift")
    assert reloaded["samples"] == 0  # a new load starts a new window


def test_series_are_bounded_by_the_layer_setting(drift_repository: Path) -> None:
    """drift_metrics_layers 0: the per-version series stay, no per-layer series."""
    with (
        running_server(_settings(drift_repository, drift_metrics_layers=0)) as bounded,
        httpx.Client(base_url=bounded.url, timeout=30) as http,
    ):
        batch = np.random.default_rng(7).normal(size=(4, 8)).astype(np.float32)
        _json_infer(http, "/v2/models/exact/infer", batch)
        assert bounded.app.state.dataplane.drift.wait_idle(WAIT_SECONDS)
        assert _metric_lines(http, "bnfold_drift_window_samples", "exact")
        assert not _metric_lines(http, "bnfold_drift_kl_divergence", "exact")


def test_results_are_byte_identical_with_monitoring_on_and_off(
    client: httpx.Client, server: RunningServer, drift_repository: Path
) -> None:
    rng = np.random.default_rng(8)
    batches = [rng.normal(size=(rows, 8)).astype(np.float32) for rows in (1, 5, 16)]
    compare_body = {
        "inputs": [
            {"name": "input", "shape": [5, 8], "datatype": "FP32", "data": batches[1].tolist()}
        ],
        "return_outputs": True,
    }

    def answers(http: httpx.Client) -> list[bytes]:
        found = []
        for batch in batches:
            found.append(_json_infer(http, "/v2/models/identical/infer", batch))
            found.append(_binary_infer(http, "/v2/models/identical/infer", batch))
        response = http.post("/v2/models/identical/compare", json=compare_body)
        assert response.status_code == 200, response.text
        return [*found, response.content]

    with (
        running_server(_settings(drift_repository, drift_monitoring=False)) as off,
        httpx.Client(base_url=off.url, timeout=30) as http,
    ):
        without = answers(http)
        report = http.get("/v2/models/identical/drift").json()
    assert answers(client) == without
    assert report["available"] is False
    assert "monitoring is off" in report["reason"]


# ---------------------------------------------------------------- converted digits models

DRIFT_DIGITS = ("digits_mlp", "digits_resnet")


def _has_calibration_graph(package: Path) -> bool:
    manifest = package / "manifest.json"
    return manifest.is_file() and parse_manifest(manifest.read_bytes()).has_calibration_graph


@pytest.fixture(scope="module")
def calibrated_digits(digits_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP and ResNet with calibration.onnx: the session's digits repository
    when its packages have it, else converted here (an embedded repository built before
    schema 2; needs the converter, i.e. torch)."""
    if all(_has_calibration_graph(digits_repository / name / "1") for name in DRIFT_DIGITS):
        return digits_repository
    from bnfold.convert.repository_build import build_default_repository

    repository = tmp_path_factory.mktemp("digits-drift") / "repository"
    build_default_repository(repository, names=list(DRIFT_DIGITS))
    return repository


@pytest.fixture(scope="module")
def digits_pixels() -> np.ndarray:
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    from bnfold.models import digits_dataset

    return digits_dataset().test_inputs


def _torch_bn_inputs(name: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every BatchNorm's input of the torch model in eval mode, by module name (float64)."""
    torch = pytest.importorskip("torch")
    from bnfold.models import load_builtin

    model = load_builtin(name).eval()
    captured: dict[str, np.ndarray] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, layer=layer: captured.__setitem__(layer, args[0].double().numpy())
        )
        for layer, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model(torch.from_numpy(inputs))
    for hook in hooks:
        hook.remove()
    return captured


def _digits_inputs(name: str, pixels: np.ndarray) -> np.ndarray:
    from bnfold.models import builtin_model

    return builtin_model(name).digits_inputs(pixels).astype(np.float32)


@pytest.mark.parametrize("name", DRIFT_DIGITS)
def test_converted_digits_models_match_torch_hooks(
    calibrated_digits: Path, digits_pixels: np.ndarray, name: str
) -> None:
    inputs = _digits_inputs(name, digits_pixels[:40])
    with (
        running_server(_settings(calibrated_digits)) as digits,
        httpx.Client(base_url=digits.url, timeout=30) as http,
    ):
        start = 0
        for rows in (1, 3, 7, 1, 7, 3, 1, 1, 7, 3, 6):
            _json_infer(http, f"/v2/models/{name}/infer", inputs[start : start + rows])
            start += rows
        report = _drift(http, digits, f"/v2/models/{name}/drift?channels=true")
    activations = _torch_bn_inputs(name, inputs[:start])
    assert {layer["name"] for layer in report["layers"]} == set(activations)
    manifest = parse_manifest((calibrated_digits / name / "1" / "manifest.json").read_bytes())
    manifest_layers = {layer.name: layer for layer in manifest.batchnorm.layers}
    torch_kl = {}
    for layer in report["layers"]:
        values = activations[layer["name"]]
        axes = (0, *range(2, values.ndim))
        mean, var = values.mean(axis=axes), values.var(axis=axes)
        assert layer["values_per_channel"] == values.size // values.shape[1]
        # torch and onnxruntime compute the same float32 network with different kernels:
        # measured within 2e-7 of the activations' scale; 1e-5 leaves room for other CPUs
        channels = layer["channel_statistics"]
        scale = float(np.abs(values).max())
        np.testing.assert_allclose(channels["mean"], mean, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(channels["var"], var, rtol=0, atol=1e-5 * scale**2)
        running = manifest_layers[layer["name"]]
        expected = drift_measures(running.running_mean, running.running_var, running.eps, mean, var)
        torch_kl[layer["name"]] = expected["kl_divergence"]["mean"]
        assert layer["kl_divergence"]["mean"] == pytest.approx(torch_kl[layer["name"]], abs=1e-5)
    assert [layer["name"] for layer in report["layers"]] == sorted(
        torch_kl, key=torch_kl.__getitem__, reverse=True
    )
    drifted = sum(kl > report["kl_threshold"] for kl in torch_kl.values())
    assert report["verdict"]["drifted_layers"] == drifted


def test_shifted_digits_drift_and_the_gauges_stay_bounded(
    calibrated_digits: Path, digits_pixels: np.ndarray
) -> None:
    """digits_resnet (6 BNs) under a brightness gain x3 + 1 drifts; with
    drift_metrics_layers 2 only its two worst layers have gauges."""
    settings = _settings(calibrated_digits, drift_metrics_layers=2)
    with (
        running_server(settings) as digits,
        httpx.Client(base_url=digits.url, timeout=30) as http,
    ):
        clean = _digits_inputs("digits_mlp", digits_pixels[:64])
        shifted = 3 * _digits_inputs("digits_resnet", digits_pixels[:64]) + 1
        for start in range(0, 64, 16):
            _json_infer(http, "/v2/models/digits_mlp/infer", clean[start : start + 16])
            _json_infer(http, "/v2/models/digits_resnet/infer", shifted[start : start + 16])
        calm = _drift(http, digits, "/v2/models/digits_mlp/drift")
        drifted = _drift(http, digits, "/v2/models/digits_resnet/drift")
        kl = _metric_lines(http, "bnfold_drift_kl_divergence", "digits_resnet")
        shift = _metric_lines(http, "bnfold_drift_mean_shift", "digits_resnet")
    assert calm["verdict"]["status"] == "ok"
    assert drifted["verdict"]["status"] == "drifted"
    worst = [layer["name"] for layer in drifted["layers"][:2]]
    expected = {f'layer="{layer}",model="digits_resnet",version="1"' for layer in worst}
    assert set(kl) == expected
    assert set(shift) == expected
