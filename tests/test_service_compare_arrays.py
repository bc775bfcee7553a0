"""POST .../compare with .npy and .npz bodies, and the per-channel drill-down (`channels`).

Real servers on 127.0.0.1, real httpx. An array body must give exactly the
report the same arrays give as V2 JSON (the same sessions run the same
numbers). The drill-down is checked against the package's own train.onnx run
directly with onnxruntime (its `<layer>.batch_mean/batch_var` outputs) and
against a float64 numpy reference for the test MLP, with the mean shift and KL
recomputed here from the manifest's running statistics. Hostile bodies (object
arrays, a header declaring terabytes, zip bombs, lying zip sizes) must be
refused with a 4xx and leave the server serving with its decode budget free.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bnfold.service.errors import BadRequest, PayloadTooLarge
from bnfold.service.protocol import CompareResponse
from bnfold.service.rest.arrays import MAX_NPZ_MEMBERS, inputs_by_name, read_npy, read_npz
from bnfold.service.settings import MIB, Settings

from service_packages import BN_EPS, MLP_SEEDS, mlp_reference, mlp_weights
from service_server import RunningServer, running_server

FLOAT32_EPS = float(np.finfo(np.float32).eps)
NPY = {"Content-Type": "application/x-npy"}
NPZ = {"Content-Type": "application/x-npz"}


def _npy(array: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **options)
    return buffer.getvalue()


def _npz(*unnamed: np.ndarray, compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, *unnamed, **arrays)
    return buffer.getvalue()


def _tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": datatype,
            "data": array.ravel().tolist()}  # fmt: skip


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return CompareResponse.model_validate(response.json()).model_dump(exclude_none=True)


def _refused(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message
    return message


@pytest.fixture(scope="module")
def digits(digits_service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=digits_service.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def client(service: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """16 digits-sized rows, off the training distribution (uniform in [0, 16])."""
    return np.random.default_rng(21).uniform(0, 16, size=(16, 64)).astype(np.float32)


# ---------------------------------------------------------------- array bodies


def test_npy_body_gives_the_v2_json_report(digits: httpx.Client, images: np.ndarray) -> None:
    path = "/v2/models/digits_mlp/compare"
    json_report = digits.post(path, json={"inputs": [_tensor("input", images)]})
    npy_report = digits.post(path, content=_npy(images), headers=NPY)
    octet = digits.post(
        path, content=_npy(images), headers={"Content-Type": "application/octet-stream"}
    )
    assert json_report.status_code == 200, json_report.text
    assert npy_report.content == json_report.content
    assert octet.content == json_report.content
    # the options of an array body come from the query string
    with_outputs = digits.post(
        "/v2/models/digits_mlp/versions/1/compare?return_outputs=true",
        content=_npy(images),
        headers=NPY,
    )
    expected = digits.post(
        path, json={"inputs": [_tensor("input", images)], "return_outputs": True}
    )
    assert _ok(with_outputs) == _ok(expected)
    assert "eval_outputs" in _ok(with_outputs)


def test_fortran_order_npy_is_the_same_array(digits: httpx.Client, images: np.ndarray) -> None:
    path = "/v2/models/digits_mlp/compare"
    c_order = digits.post(path, content=_npy(images), headers=NPY)
    fortran = digits.post(path, content=_npy(np.asfortranarray(images)), headers=NPY)
    assert fortran.content == c_order.content


def test_npz_of_a_one_input_model_takes_any_single_name(
    digits: httpx.Client, images: np.ndarray
) -> None:
    path = "/v2/models/digits_mlp/compare"
    expected = digits.post(path, content=_npy(images), headers=NPY)
    for body in (
        _npz(input=images),
        _npz(compressed=True, batch=images),
        _npz(images),  # np.savez's own name, arr_0
    ):
        for content_type in ("application/x-npz", "application/zip"):
            answer = digits.post(path, content=body, headers={"Content-Type": content_type})
            assert answer.content == expected.content, answer.text


def _dtypes_arrays(rows: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    return {
        "a": rng.normal(size=(rows, 3)),
        "b": rng.integers(-100, 100, size=(rows, 3), dtype=np.int32),
        "c": rng.integers(0, 2, size=(rows, 3)).astype(bool),
        "d": rng.normal(size=(rows, 3)).astype(np.float16),
    }


def test_npz_by_input_name_gives_the_v2_json_report(client: httpx.Client) -> None:
    """The four-input `dtypes` model: every datatype family through an .npz."""
    arrays = _dtypes_arrays()
    datatypes = {"a": "FP64", "b": "INT32", "c": "BOOL", "d": "FP16"}
    v2 = client.post(
        "/v2/models/dtypes/compare",
        json={
            "inputs": [_tensor(name, array, datatypes[name]) for name, array in arrays.items()],
            "return_outputs": True,
        },
    )
    reordered = {name: arrays[name] for name in ("d", "b", "c", "a")}  # names, not positions
    npz = client.post(
        "/v2/models/dtypes/compare?return_outputs=true",
        content=_npz(compressed=True, **reordered),
        headers=NPZ,
    )
    assert v2.status_code == 200, v2.text
    assert npz.content == v2.content
    [sum_output] = [output for output in _ok(npz)["eval_outputs"] if output["name"] == "sum"]
    expected_sum = (
        arrays["a"] + arrays["b"] + arrays["c"] + arrays["d"].astype(np.float64)
    ).ravel()
    np.testing.assert_array_equal(sum_output["data"], expected_sum)


def test_wrong_array_names_are_refused_with_the_inputs_named(client: httpx.Client) -> None:
    arrays = _dtypes_arrays()
    path = "/v2/models/dtypes/compare"
    one = client.post(path, content=_npy(arrays["a"]), headers=NPY)
    _refused(one, 400, "one .npy array", "4 inputs", "a, b, c, d", ".npz")
    missing = {name: array for name, array in arrays.items() if name != "d"}
    _refused(client.post(path, content=_npz(**missing), headers=NPZ), 400, "lacks d", "a, b, c, d")
    extra = client.post(path, content=_npz(**arrays, e=arrays["a"]), headers=NPZ)
    _refused(extra, 400, "has unknown e")
    two = client.post(
        "/v2/models/mlp/compare", content=_npz(x=np.zeros((4, 8), np.float32), y=np.zeros(3))
    )
    assert two.status_code == 400  # no Content-Type: a V2 body, and not JSON


def test_arrays_that_do_not_fit_the_model_are_422_as_v2_tensors(client: httpx.Client) -> None:
    batch = np.random.default_rng(2).normal(size=(6, 8))
    path = "/v2/models/mlp/compare"
    _refused(client.post(path, content=_npy(batch), headers=NPY), 422, "FP64", "FP32")
    narrow = batch[:, :5].astype(np.float32)
    _refused(client.post(path, content=_npy(narrow), headers=NPY), 422, "shape [6, 5]", "[-1, 8]")
    with_nan = batch.astype(np.float32)
    with_nan[2, 3] = np.nan
    _refused(client.post(path, content=_npz(input=with_nan), headers=NPZ), 422, "NaN")
    _refused(client.post(path, content=_npy(narrow[:1, :]), headers=NPY), 422)


def test_unreadable_arrays_are_400(client: httpx.Client) -> None:
    path = "/v2/models/mlp/compare"
    objects = np.array([{"x": 1}, None], dtype=object)
    _refused(
        client.post(path, content=_npy(objects, allow_pickle=True), headers=NPY),
        400,
        "Python objects",
    )
    pickled = _npz(input=objects)  # np.savez pickles object arrays
    _refused(client.post(path, content=pickled, headers=NPZ), 400, "Python objects")
    _refused(client.post(path, content=b"not numpy", headers=NPY), 400, "not a .npy array")
    _refused(client.post(path, content=b"not a zip", headers=NPZ), 400, "not an .npz archive")
    complex_values = np.zeros((4, 8), np.complex64)
    _refused(client.post(path, content=_npy(complex_values), headers=NPY), 400, "no V2 datatype")
    big_endian = np.zeros((4, 8), ">f4")
    _refused(client.post(path, content=_npy(big_endian), headers=NPY), 400, "byte order")
    truncated = _npy(np.zeros((4, 8), np.float32))[:-4]
    _refused(client.post(path, content=truncated, headers=NPY), 400, "124 bytes of data follow")


def _huge_header(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring `shape` of float32, followed by 16 bytes of data."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(16)


def test_a_header_declaring_terabytes_allocates_nothing(client: httpx.Client) -> None:
    """np.load would allocate the declared 64 TiB first (a MemoryError, a 500)."""
    huge = client.post("/v2/models/mlp/compare", content=_huge_header((2**41, 8)), headers=NPY)
    _refused(huge, 400, "declares shape [2199023255552, 8]", "16 bytes of data follow")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1,) * 40, "at most 32 dimensions"),
        ((0, -5), "none negative"),
        ((0, 2**63), "too large for any array"),
        ((0, 2**40, 2**40), "too large for any array"),
    ],
)
def test_read_npy_refuses_shapes_numpy_cannot_make(shape: tuple[int, ...], message: str) -> None:
    """Headers with no data to check against (zero elements, or one): refused, not a 500."""
    body = _huge_header(shape)[:-16] + (bytes(4) if math.prod(shape) == 1 else b"")
    with pytest.raises(BadRequest, match=message):
        read_npy(body)


# ---------------------------------------------------------------- zip bombs


def _lying_zip(declared: int) -> bytes:
    """One deflated member (32 KiB of zeros as .npy) whose local and central headers claim
    it inflates to `declared` bytes."""
    payload = _npy(np.zeros((1024, 8), np.float32))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", payload)
    data = bytearray(buffer.getvalue())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, declared)
    struct.pack_into("<I", data, central + 24, declared)
    return bytes(data)


def _many_members(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(count):
            archive.writestr(f"a{index}.npy", _npy(np.zeros(1, np.float32)))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_budget(service_repository: Path) -> Iterator[RunningServer]:
    """Bodies up to 1 MiB, decoding up to 8 MiB in flight."""
    settings = Settings(
        repository=service_repository,
        device="cpu",
        max_body_bytes=MIB,
        max_decode_bytes=8 * MIB,
    )
    with running_server(settings) as server:
        yield server


def test_zip_bombs_are_refused_before_inflating(small_budget: RunningServer) -> None:
    zeros = np.zeros((2 * MIB, 8), np.float32)  # 64 MiB of zeros: ~65 KB deflated
    bomb = _npz(compressed=True, input=zeros)
    assert len(bomb) < MIB
    split = _npz(compressed=True, a=zeros[: MIB // 8], b=zeros[: MIB // 8], c=zeros[: MIB // 8])
    batch = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)
    path = "/v2/models/mlp/compare"
    with httpx.Client(base_url=small_budget.url, timeout=30) as client:
        _refused(client.post(path, content=bomb, headers=NPZ), 413, "decode budget")
        # three members each within the budget, together over it
        _refused(client.post(path, content=split, headers=NPZ), 413, "decode budget")
        _refused(client.post(path, content=_lying_zip(9 * MIB), headers=NPZ), 413)
        for understated in (128, 64 * 1024):
            lie = client.post(path, content=_lying_zip(understated), headers=NPZ)
            _refused(lie, 400, "'input.npy'")
        _refused(
            client.post(path, content=_many_members(MAX_NPZ_MEMBERS + 1), headers=NPZ),
            400,
            f"at most {MAX_NPZ_MEMBERS}",
        )
        served = client.post(path, content=_npz(input=batch), headers=NPZ)
        assert served.status_code == 200, served.text
        assert client.get("/v2/health/ready").status_code == 200
    assert small_budget.app.state.decode_budget.in_flight == 0


def test_a_large_npy_body_is_refused_by_the_body_limit(small_budget: RunningServer) -> None:
    rows = np.zeros((MIB // 32 + 1, 8), np.float32)  # just over 1 MiB
    with httpx.Client(base_url=small_budget.url, timeout=30) as client:
        response = client.post("/v2/models/mlp/compare", content=_npy(rows), headers=NPY)
    _refused(response, 413, "limit")


@pytest.mark.parametrize("kind", ["npy", "npz", "npz deflated"])
def test_mutated_bodies_are_read_or_refused_with_a_client_error(kind: str) -> None:
    """Bytes of a valid body changed at random (and cut short now and then), half of the
    time within the headers: each read is arrays or a 400/413, never another exception
    (which the server would answer with a 500). Found numpy's TokenError and zipfile's
    NotImplementedError."""
    array = np.arange(64, dtype=np.float32).reshape(8, 8)
    read: Callable[[bytes], object] = read_npy
    body = _npy(array)
    if kind != "npy":
        body = _npz(input=array, other=np.ones(3), compressed=kind == "npz deflated")
        read = functools.partial(read_npz, limit=8 * MIB)
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(3000):
        mutated = bytearray(body)
        region = len(body) if rng.random() < 0.5 else min(len(body), 200)
        for position in rng.integers(0, region, size=rng.integers(1, 6)):
            mutated[position] = int(rng.integers(0, 256))
        if rng.random() < 0.1:
            mutated = mutated[: rng.integers(0, len(mutated))]
        try:
            read(bytes(mutated))
            outcomes.add("read")
        except (BadRequest, PayloadTooLarge) as exc:
            outcomes.add(type(exc).__name__)
    assert {"read", "BadRequest"} <= outcomes


def test_read_npy_is_a_view_of_the_body() -> None:
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    body = _npy(array)
    read = read_npy(body)
    np.testing.assert_array_equal(read, array)
    assert read.dtype == np.int64 and read.base is not None and not read.flags.writeable


def test_inputs_by_name_follows_the_calibration_data_rule() -> None:
    x, y = np.zeros(2), np.ones(2)
    assert inputs_by_name(x, ["input"])["input"] is x
    assert inputs_by_name({"any": x}, ["input"])["input"] is x
    assert list(inputs_by_name({"b": y, "a": x}, ["a", "b"])) == ["a", "b"]
    with pytest.raises(BadRequest, match=r"2 inputs \(a, b\)"):
        inputs_by_name(x, ["a", "b"])
    with pytest.raises(BadRequest, match="lacks b and has unknown c"):
        inputs_by_name({"a": x, "c": y}, ["a", "b"])
    with pytest.raises(BadRequest, match="has unknown b"):
        inputs_by_name({"input": x, "b": y}, ["input"])


# ---------------------------------------------------------------- the per-channel drill-down


def _expected_channels(
    running_mean: np.ndarray, running_var: np.ndarray, eps: float, mean: np.ndarray, var: np.ndarray
) -> dict[str, np.ndarray]:
    """Mean shift and KL per channel, from the definitions (service/compare.py docstring)."""
    running_var = np.asarray(running_var, np.float64) + eps
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    shift = np.abs(mean - np.asarray(running_mean, np.float64)) / np.sqrt(running_var)
    ratio = (var + eps) / running_var
    return {"mean_shift": shift, "kl_divergence": 0.5 * (ratio + shift**2 - 1 - np.log(ratio))}


def test_channels_of_the_test_mlp_match_a_numpy_reference(client: httpx.Client) -> None:
    batch = (np.random.default_rng(5).normal(size=(64, 8)) + 0.5).astype(np.float32)
    report = _ok(
        client.post("/v2/models/mlp/compare?channels=true", content=_npy(batch), headers=NPY)
    )
    [layer] = report["batchnorm"]
    weights = mlp_weights(MLP_SEEDS[2])  # unversioned: the highest version, 2
    assert report["model_version"] == "2"
    reference = mlp_reference(weights, batch)
    statistics = layer["channel_statistics"]
    # float32 Gemm and batch moments in onnxruntime against float64 numpy: a few ulps of the
    # hidden activations' scale (of its square for the variance); 64 ulps leave margin
    scale = float(np.abs(batch.astype(np.float64) @ weights.w1 + weights.b1).max())
    np.testing.assert_allclose(
        statistics["mean"], reference["batch_mean"], rtol=0, atol=64 * FLOAT32_EPS * scale
    )
    np.testing.assert_allclose(
        statistics["var"], reference["batch_var"], rtol=0, atol=64 * FLOAT32_EPS * scale**2
    )
    expected = _expected_channels(
        weights.running_mean, weights.running_var, BN_EPS, reference["batch_mean"],
        reference["batch_var"],
    )  # fmt: skip
    for key in ("mean_shift", "kl_divergence"):
        np.testing.assert_allclose(statistics[key], expected[key], rtol=1e-4, atol=1e-6)
        assert len(statistics[key]) == layer["channels"] == 16


def _train_statistics(package: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    """train.onnx's `<layer>.batch_mean/batch_var` outputs on `batch`, by output name."""
    session = ort.InferenceSession(str(package / "train.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": batch}), strict=True))


def _calibration_statistics(package: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(package / "calibration.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": batch}), strict=True))


@pytest.mark.parametrize(
    ("model", "shape"), [("digits_mlp", (16, 64)), ("digits_resnet", (16, 1, 8, 8))]
)
def test_channels_of_the_digits_models_are_train_onnx_statistics(
    digits: httpx.Client, digits_repository: Path, images: np.ndarray, model: str, shape: tuple
) -> None:
    batch = images.reshape(shape)
    package = digits_repository / model / "1"
    manifest = json.loads((package / "manifest.json").read_text())
    plain = _ok(digits.post(f"/v2/models/{model}/compare", content=_npy(batch), headers=NPY))
    drill = _ok(
        digits.post(f"/v2/models/{model}/compare?channels=true", content=_npy(batch), headers=NPY)
    )
    assert all("channel_statistics" not in layer for layer in plain["batchnorm"])
    # the flag adds the drill-down and changes nothing else
    assert [
        {key: value for key, value in layer.items() if key != "channel_statistics"}
        for layer in drill["batchnorm"]
    ] == plain["batchnorm"]
    assert {key: value for key, value in drill.items() if key != "batchnorm"} == {
        key: value for key, value in plain.items() if key != "batchnorm"
    }

    train = _train_statistics(package, batch)
    calibration = _calibration_statistics(package, batch)
    layers = {layer["name"]: layer for layer in manifest["batchnorm"]["layers"]}
    assert {layer["name"] for layer in drill["batchnorm"]} == set(layers)
    first = manifest["batchnorm"]["layers"][0]["name"]
    for entry in drill["batchnorm"]:
        running = layers[entry["name"]]
        statistics = entry["channel_statistics"]
        mean = train[running["batch_mean_output"]].astype(np.float64)
        var = train[running["batch_var_output"]].astype(np.float64)
        # the server's session and this one run the same float32 graph, maybe with other
        # thread counts (reduction order): 16 ulps of the statistic's scale
        np.testing.assert_allclose(
            statistics["mean"], mean, rtol=0, atol=16 * FLOAT32_EPS * np.abs(mean).max()
        )
        np.testing.assert_allclose(
            statistics["var"], var, rtol=0, atol=16 * FLOAT32_EPS * np.abs(var).max()
        )
        if entry["name"] == first:
            # nothing upstream normalises: the BN's input is the same in eval mode
            np.testing.assert_allclose(
                statistics["mean"], calibration[f"{first}.input_mean"], rtol=0,
                atol=16 * FLOAT32_EPS * np.abs(mean).max(),
            )  # fmt: skip
        expected = _expected_channels(
            running["running_mean"], running["running_var"], running["eps"], mean, var
        )
        for key in ("mean_shift", "kl_divergence"):
            np.testing.assert_allclose(statistics[key], expected[key], rtol=1e-4, atol=1e-6)
        # the spreads of the entry are over these very channels
        assert entry["kl_divergence"]["mean"] == pytest.approx(
            np.mean(statistics["kl_divergence"]), rel=1e-9
        )
        assert entry["mean_shift"]["max"] == pytest.approx(max(statistics["mean_shift"]), rel=1e-9)
        assert len(statistics["mean"]) == entry["channels"] == running["channels"]


def test_channels_by_query_or_json_parameter(client: httpx.Client) -> None:
    batch = np.random.default_rng(6).normal(size=(8, 2, 3, 3)).astype(np.float32)
    body = {"inputs": [_tensor("image", batch)]}
    path = "/v2/models/pixels/compare"
    by_query = _ok(client.post(f"{path}?channels=true", json=body))
    by_parameter = _ok(client.post(path, json={**body, "parameters": {"channels": True}}))
    off = client.post(f"{path}?channels=false", json=body)
    plain = client.post(path, json=body)
    assert by_query == by_parameter
    assert len(by_query["batchnorm"][0]["channel_statistics"]["mean"]) == 2
    np.testing.assert_allclose(
        by_query["batchnorm"][0]["channel_statistics"]["mean"],
        batch.astype(np.float64).mean(axis=(0, 2, 3)),
        rtol=0,
        atol=64 * FLOAT32_EPS * float(np.abs(batch).max()),
    )
    assert off.content == plain.content
    assert "channel_statistics" not in plain.text
    _refused(client.post(f"{path}?channels=yes", json=body), 400, "'channels'", "true or false")
    _refused(client.post(path, json={**body, "parameters": {"channels": "yes"}}), 400, "'channels'")
    _refused(client.post(f"{path}?return_outputs=2", json=body), 400, "'return_outputs'")
