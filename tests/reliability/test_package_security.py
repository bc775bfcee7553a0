"""Security of packages: a package is untrusted input, and the server reads nothing outside the
repository and serves no byte the manifest has not vouched for.

* External data (an ONNX tensor whose bytes live in another file) is read only
  from the package's hashed files, in memory: a location that is absolute,
  climbs with `..`, names a file the manifest does not list, or points past a
  file's end makes the package unavailable, whatever the server's working
  directory holds. A package with a real `model.onnx.data` loads from any
  working directory, and a same-named decoy in the working directory changes
  nothing.
* Symlinks: a listed file, a manifest or a package directory that resolves
  outside the repository is refused, even when its hash matches.
* There is no optimised-graph cache: a tampered `model.ort-opt.*.onnx` left by
  an older version is never read, and loading writes nothing into the repository.
* Versions are 1..2**63-1, the same rule in the scan and for requests.
* The unauthenticated index never shows the server's absolute paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from bnfold.service.errors import NotFound
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.repository import scan_repository
from bnfold.service.sessions import SessionConfig
from bnfold.service.settings import Settings

from service_packages import mlp_reference, mlp_weights, write_mlp
from service_server import running_server

CPU = SessionConfig(providers=("CPUExecutionProvider",))
SEED = 1
#: float32 graph against the float64 reference: a few ulps of outputs of size ~1.
TOLERANCE = 1e-5


def _rehash(package: Path) -> None:
    """Make the manifest list every regular file of the package with its true sha256, as a
    careful attacker (or the converter) would: the checks below must hold anyway."""
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"] = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(package.iterdir())
        if path.name != "manifest.json" and path.is_file()
    }
    (package / "manifest.json").write_text(json.dumps(manifest))


def _externalise(
    package: Path, graph_file: str, tensor_name: str, location: str, data: bytes | None = None
) -> bytes:
    """Move `tensor_name`'s bytes out of `graph_file` to `location` (written into the package
    when `data` is None and the location is a plain name). Returns the tensor's true bytes."""
    model = onnx.load(str(package / graph_file))
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    raw = onnx.numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (package / graph_file).write_bytes(model.SerializeToString())
    if data is None and "/" not in location:
        (package / location).write_bytes(raw)
    _rehash(package)
    return raw


def _registry_entry(repository: Path) -> tuple[ModelState, str]:
    registry = ModelRegistry(repository, CPU)
    [entry] = registry.load_all()
    return entry.state, entry.reason


def _served_output(repository: Path, batch: np.ndarray) -> np.ndarray:
    registry = ModelRegistry(repository, CPU)
    registry.load_all()
    model = registry.get("mlp")
    return model.eval_session.run(None, {"input": batch})[0]


def _batch() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)


@pytest.mark.parametrize(
    "location",
    ["w.bin", "../w.bin", "../../../w.bin", "/etc/passwd", "etc/passwd", "sub/../w.bin", "a\\b"],
)
def test_external_data_outside_the_package_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    """The server's working directory holds a file of the right size under the name the graph
    asks for; before the fix, onnxruntime read it (and served its bytes as a weight)."""
    repository = tmp_path / "repo"
    package = write_mlp(repository, "mlp", 1, seed=SEED)
    workdir = tmp_path / "cwd"
    (workdir / "etc").mkdir(parents=True)
    raw = _externalise(package, "model.onnx", "b2", location, data=b"")
    for decoy in ("w.bin", "etc/passwd"):
        (workdir / decoy).write_bytes(b"\x7f" * len(raw))
    (tmp_path / "w.bin").write_bytes(b"\x7f" * len(raw))
    monkeypatch.chdir(workdir)
    if location == "w.bin":  # a plain name the manifest does not list
        (package / "w.bin").unlink(missing_ok=True)
    state, reason = _registry_entry(repository)
    assert state is ModelState.UNAVAILABLE
    assert "tensor 'b2' takes its data from" in reason
    assert str(tmp_path) not in reason


def test_external_data_range_past_the_file_is_refused(tmp_path: Path) -> None:
    package = write_mlp(tmp_path, "mlp", 1, seed=SEED)
    _externalise(package, "model.onnx", "b2", "model.onnx.data")
    (package / "model.onnx.data").write_bytes(b"\0" * 4)  # shorter than b2
    _rehash(package)
    state, reason = _registry_entry(tmp_path)
    assert state is ModelState.UNAVAILABLE
    assert "outside the file's 4" in reason


def test_a_package_with_its_own_external_data_loads_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `bnfold convert` writes a large model: model.onnx + model.onnx.data, both hashed.
    Before the fix this failed to load, and with a decoy in the working directory it served
    the decoy's weights."""
    repository = tmp_path / "repo"
    package = write_mlp(repository, "mlp", 1, seed=SEED)
    raw = _externalise(package, "model.onnx", "w1", "model.onnx.data")
    _externalise(package, "train.onnx", "w1", "train.onnx.data")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "model.onnx.data").write_bytes(b"\x7f" * len(raw))  # the decoy
    monkeypatch.chdir(workdir)
    batch = _batch()
    expected = mlp_reference(mlp_weights(SEED), batch)["eval"]
    np.testing.assert_allclose(_served_output(repository, batch), expected, atol=TOLERANCE)


def test_a_listed_file_that_is_a_symlink_out_of_the_package_is_refused(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    package = write_mlp(repository, "mlp", 1, seed=SEED)
    raw = _externalise(package, "model.onnx", "b2", "model.onnx.data")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(raw)
    (package / "model.onnx.data").unlink()
    (package / "model.onnx.data").symlink_to(outside)
    _rehash(package)  # the hash matches the outside file's bytes
    state, reason = _registry_entry(repository)
    assert state is ModelState.UNAVAILABLE
    assert "model.onnx.data resolves outside the model repository" in reason


def test_a_package_directory_outside_the_repository_is_refused(tmp_path: Path) -> None:
    elsewhere = write_mlp(tmp_path / "elsewhere", "mlp", 1, seed=SEED)
    repository = tmp_path / "repo"
    (repository / "mlp").mkdir(parents=True)
    (repository / "mlp" / "1").symlink_to(elsewhere, target_is_directory=True)
    state, reason = _registry_entry(repository)
    assert state is ModelState.UNAVAILABLE
    assert "resolves outside the model repository" in reason


def test_a_manifest_symlinked_out_of_the_package_is_refused(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    package = write_mlp(repository, "mlp", 1, seed=SEED)
    outside = tmp_path / "manifest.json"
    (package / "manifest.json").rename(outside)
    (package / "manifest.json").symlink_to(outside)
    state, reason = _registry_entry(repository)
    assert state is ModelState.UNAVAILABLE
    assert "manifest.json resolves outside" in reason


def test_a_repository_reached_through_a_symlink_still_serves(tmp_path: Path) -> None:
    """The boundary is the repository's real path: a symlinked repository is fine."""
    write_mlp(tmp_path / "real", "mlp", 1, seed=SEED)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert _registry_entry(tmp_path / "link") == (ModelState.READY, "")


def test_a_tampered_optimised_cache_is_never_served(tmp_path: Path) -> None:
    """Older versions kept `model.ort-opt.cpu.<key>.onnx` in the package and loaded it
    unchecked: a bias of +1000 in it was served. Now the file is never read, and loading
    writes nothing into the repository."""
    package = write_mlp(tmp_path, "mlp", 1, seed=SEED)
    tampered = onnx.load(str(package / "model.onnx"))
    bias = next(t for t in tampered.graph.initializer if t.name == "b2")
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 1000.0, "b2"))
    for key in ("0123456789abcdef", "x"):
        onnx.save(tampered, package / f"model.ort-opt.cpu.{key}.onnx")
    before = sorted((path.name, path.stat().st_mtime_ns) for path in package.iterdir())
    batch = _batch()
    expected = mlp_reference(mlp_weights(SEED), batch)["eval"]
    np.testing.assert_allclose(_served_output(tmp_path, batch), expected, atol=TOLERANCE)
    np.testing.assert_allclose(_served_output(tmp_path, batch), expected, atol=TOLERANCE)
    assert sorted((path.name, path.stat().st_mtime_ns) for path in package.iterdir()) == before


def test_a_read_only_repository_serves(tmp_path: Path) -> None:
    package = write_mlp(tmp_path, "mlp", 1, seed=SEED)
    for path in (package, package.parent, tmp_path):
        path.chmod(0o555)
    try:
        assert _registry_entry(tmp_path) == (ModelState.READY, "")
    finally:
        for path in (tmp_path, package.parent, package):
            path.chmod(0o755)


def test_versions_follow_one_rule_in_the_scan_and_in_requests(tmp_path: Path) -> None:
    largest = 2**63 - 1
    write_mlp(tmp_path, "mlp", largest, seed=SEED)
    write_mlp(tmp_path, "mlp", 1, seed=SEED)
    too_large = write_mlp(tmp_path, "mlp", 2, seed=SEED)
    too_large.rename(too_large.parent / "99999999999999999999")
    assert [found.version for found in scan_repository(tmp_path)] == [1, largest]
    registry = ModelRegistry(tmp_path, CPU)
    registry.load_all()
    assert registry.get("mlp").version == largest
    assert registry.get("mlp", str(largest)).version == largest
    with pytest.raises(NotFound, match=f"versions: 1, {largest}\\)"):
        registry.get("mlp", "99999999999999999999")


def test_the_index_shows_no_absolute_server_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's error for an escaping external-data path named the resolved absolute
    path, and a symlink loop's error names the path it looped on: the unauthenticated
    index shows neither."""
    repository = tmp_path / "repo"
    looped = write_mlp(repository, "looped", 1, seed=SEED)
    (looped / "train.onnx").unlink()
    (looped / "train.onnx").symlink_to(looped / "train.onnx")
    escaping = write_mlp(repository, "escaping", 1, seed=SEED)
    _externalise(escaping, "model.onnx", "b2", "../../w.bin", data=b"")
    workdir = tmp_path / "server" / "runs" / "here"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    with running_server(Settings(repository=repository, device="cpu")) as server:
        index = httpx.post(f"{server.url}/v2/repository/index").json()
    assert [entry["state"] for entry in index] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert "../../w.bin" in index[0]["reason"] and "train.onnx" in index[1]["reason"]
    for entry in index:
        assert str(tmp_path) not in entry["reason"]
        assert os.sep + "tmp" not in entry["reason"]


def _external(name: str, values: np.ndarray, location: str) -> onnx.TensorProto:
    """A tensor whose bytes are said to live in `location` (none are kept in the proto)."""
    tensor = onnx.numpy_helper.from_array(values, name)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(values.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _identity_graph(extra_nodes: list[onnx.NodeProto], **graph_fields: object) -> onnx.GraphProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    return onnx.helper.make_graph(
        [*extra_nodes, onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [x],
        [y],
        **graph_fields,
    )


def _if_with_external_branch_weight() -> onnx.ModelProto:
    """y = x + w in the then branch of an always-true If; w lives in w.bin."""
    w = _external("w", np.zeros(8, np.float32), "w.bin")
    then_out = onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["batch", 8])
    else_out = onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["batch", 8])
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["t"])], "then", [], [then_out], [w]
    )
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["e"])], "else", [], [else_out]
    )
    condition = onnx.numpy_helper.from_array(np.array(True), "condition")
    node = onnx.helper.make_node(
        "If", ["condition"], ["y"], then_branch=then_branch, else_branch=else_branch
    )
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    graph = onnx.helper.make_graph([node], "g", [x], [y], [condition])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _sparse_external() -> onnx.ModelProto:
    values = _external("s", np.zeros(2, np.float32), "w.bin")
    indices = onnx.numpy_helper.from_array(np.array([0, 1], np.int64), "s_indices")
    sparse = onnx.helper.make_sparse_tensor(values, indices, [8])
    graph = _identity_graph([], sparse_initializer=[sparse])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _function_default_external() -> onnx.ModelProto:
    """A local function whose attribute default (a tensor) lives in w.bin."""
    default = onnx.helper.make_attribute("value", _external("d", np.zeros(8, np.float32), "w.bin"))
    function = onnx.helper.make_function(
        "local",
        "Const",
        [],
        ["out"],
        [
            onnx.helper.make_node(
                "Constant", [], ["out"], value=_external("c", np.zeros(8, np.float32), "w.bin")
            )
        ],
        [onnx.helper.make_opsetid("", 17)],
        attributes=[],
    )
    function.attribute_proto.append(default)
    graph = _identity_graph([])
    return onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)],
        functions=[function],
    )


@pytest.mark.parametrize(
    "build",
    [_if_with_external_branch_weight, _sparse_external, _function_default_external],
    ids=["if-branch-initializer", "sparse-initializer", "function-attribute-default"],
)
def test_external_data_outside_the_main_initializers_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, build: object
) -> None:
    """onnxruntime reads these from the disk (the working directory) even with an in-memory
    table: the package lists w.bin (zeros), the working directory holds a decoy, and before
    the fix the If branch served the decoy's bytes. Now such a package never loads."""
    repository = tmp_path / "repo"
    package = repository / "ext" / "1"
    package.mkdir(parents=True)
    model = build()  # type: ignore[operator]
    for graph_file in ("model.onnx", "train.onnx"):
        (package / graph_file).write_bytes(model.SerializeToString())
    (package / "w.bin").write_bytes(np.zeros(8, np.float32).tobytes())
    manifest = {
        "schema_version": 1,
        "name": "ext",
        "version": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}],
        "files": {},
    }
    (package / "manifest.json").write_text(json.dumps(manifest))
    _rehash(package)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    (workdir / "w.bin").write_bytes(np.full(8, 7.0, np.float32).tobytes())
    monkeypatch.chdir(workdir)
    state, reason = _registry_entry(repository)
    assert state is ModelState.UNAVAILABLE
    assert "keeps its data in an external file" in reason


def test_a_fifo_in_a_package_does_not_hang_the_load(tmp_path: Path) -> None:
    """`mkfifo model.onnx`: reading it blocked forever, holding the registry's lock (the
    server never became ready). Now the package is unavailable at once."""
    package = write_mlp(tmp_path, "mlp", 1, seed=SEED)
    (package / "model.onnx").unlink()
    os.mkfifo(package / "model.onnx")
    state, reason = _registry_entry(tmp_path)
    assert state is ModelState.UNAVAILABLE
    assert "model.onnx is not a regular file" in reason


def test_a_nul_in_a_listed_name_leaves_the_other_packages_serving(tmp_path: Path) -> None:
    """A manifest listing 'a\\u0000b' made Path.resolve raise ValueError, which stopped the
    whole repository from loading (the server never started)."""
    broken = write_mlp(tmp_path, "broken", 1, seed=SEED)
    write_mlp(tmp_path, "mlp", 1, seed=SEED)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["a\u0000b"] = "0" * 64
    (broken / "manifest.json").write_text(json.dumps(manifest))
    registry = ModelRegistry(tmp_path, CPU)
    states = {entry.name: entry.state for entry in registry.load_all()}
    assert states == {"broken": ModelState.UNAVAILABLE, "mlp": ModelState.READY}


def test_a_version_linked_to_the_repository_itself_is_refused(tmp_path: Path) -> None:
    """REPO/m/1 -> REPO: its 'config.json' would have been REPO/../config.json."""
    repository = tmp_path / "repo"
    write_mlp(repository, "mlp", 1, seed=SEED)
    (repository / "loop").mkdir()
    (repository / "loop" / "1").symlink_to(repository, target_is_directory=True)
    registry = ModelRegistry(repository, CPU)
    states = {(entry.name, entry.state) for entry in registry.load_all()}
    assert states == {("loop", ModelState.UNAVAILABLE), ("mlp", ModelState.READY)}
    [loop] = [entry for entry in registry.index() if entry.name == "loop"]
    assert "not REPO/NAME/VERSION" in loop.reason
