"""The reliability suite's model repository: the service test packages, two models made for
load and faults, and one broken package per fault the repository must isolate.

Built with `onnx.helper` like tests/service_packages.py (no torch), on top of it:

* `slow`: `x` [-1, 256] -> 128 x (MatMul 256x256 -> Tanh) -> `y` [-1, 256], the
  layers cycling through 8 weight matrices (a 2 MB file). Its run time grows with
  the batch (about 0.3 ms a row on one core), so a test picks how long a request
  stays in flight by its batch size, with a body small enough that one Python
  client can keep the server's cores busy.
* `lookup`: `index` INT64 [-1] -> Gather(table [10, 4]) -> `row` [-1, 4]. An index
  outside 0..9 makes onnxruntime fail at run time: the one input-dependent error
  a request can carry past every manifest check (the batch-poisoning case).
* `poison`: `lookup` again, with REPO/poison/config.json asking the batcher to wait
  up to 20 ms for up to 64 rows, so concurrent requests are merged into one run.
* `huge`: `x` [-1, 10**12] -> ReduceSum -> `total` [-1]: a consistent package whose
  declared width no request can fill; only an empty batch fits it.
* faults, each UNAVAILABLE with its reason while the rest serve:
  `corrupt_bytes` (model.onnx is garbage, and the manifest hashes the garbage),
  `hash_mismatch` (a byte appended after hashing), `missing_file` (train.onnx
  deleted), `absurd_shape` (the manifest declares [-1, 10**12] for an [N, 8] graph),
  `negative_shape` (the manifest declares [-7, 8]), `bad_manifest` (not JSON) and
  `bad_config` (REPO/bad_config/config.json has a misspelt batching field).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from service_packages import (
    _model,
    build_test_repository,
    write_lookup,
    write_mlp,
    write_package,
)

SLOW_WIDTH, SLOW_LAYERS, SLOW_WEIGHTS = 256, 128, 8
HUGE_WIDTH = 10**12

FAULTS = {
    "corrupt_bytes": "onnxruntime cannot load model.onnx",
    "hash_mismatch": "sha256 of model.onnx is",
    "missing_file": "train.onnx is listed in manifest.json but missing",
    "absurd_shape": "the manifest says [-1, 1000000000000]",
    "negative_shape": "manifest.json does not follow the package format: inputs.0",
    "bad_manifest": "manifest.json is not valid JSON",
    "bad_config": "bad_config/config.json is not a model configuration: batching.max_batch",
    "broken_hash": "sha256 of model.onnx is",
}
POISON_BATCHING = {"max_batch_size": 64, "max_queue_delay_us": 20_000}


def slow_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    scale = 1.0 / np.sqrt(SLOW_WIDTH)
    return [
        rng.normal(0.0, scale, (SLOW_WIDTH, SLOW_WIDTH)).astype(np.float32)
        for _ in range(SLOW_WEIGHTS)
    ]


def write_slow(repository: Path, name: str = "slow", version: int = 1) -> Path:
    initialisers = [
        numpy_helper.from_array(weight, f"w{index}") for index, weight in enumerate(slow_weights())
    ]
    nodes, previous = [], "x"
    for layer in range(SLOW_LAYERS):
        product, activated = f"matmul{layer}", f"tanh{layer}"
        if layer == SLOW_LAYERS - 1:
            activated = "y"
        weight = f"w{layer % SLOW_WEIGHTS}"
        nodes.append(helper.make_node("MatMul", [previous, weight], [product]))
        nodes.append(helper.make_node("Tanh", [product], [activated]))
        previous = activated
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SLOW_WIDTH])],
        initialisers,
    )
    return write_package(repository, name, version, _model(graph))


def write_huge(repository: Path, name: str = "huge", version: int = 1) -> Path:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0)],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HUGE_WIDTH])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return write_package(repository, name, version, _model(graph))


def _rewrite_manifest(package: Path, **changes: object) -> None:
    path = package / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def write_faults(repository: Path) -> None:
    """One broken package per entry of FAULTS (broken_hash comes from the service packages)."""
    corrupt = write_mlp(repository, "corrupt_bytes", 1, seed=5)
    garbage = b"\x08\x07 this is not an onnx graph " + bytes(range(256))
    (corrupt / "model.onnx").write_bytes(garbage)
    files = json.loads((corrupt / "manifest.json").read_text())["files"]
    _rewrite_manifest(corrupt, files={**files, "model.onnx": hashlib.sha256(garbage).hexdigest()})

    mismatch = write_mlp(repository, "hash_mismatch", 1, seed=6)
    with (mismatch / "model.onnx").open("ab") as handle:
        handle.write(b"\0")

    # service_packages already has a `missing_file` package (train.onnx deleted).
    absurd = write_mlp(repository, "absurd_shape", 1, seed=7)
    _rewrite_manifest(absurd, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 10**12]}])

    negative = write_mlp(repository, "negative_shape", 1, seed=8)
    _rewrite_manifest(negative, inputs=[{"name": "input", "datatype": "FP32", "shape": [-7, 8]}])

    bad_manifest = write_mlp(repository, "bad_manifest", 1, seed=9)
    (bad_manifest / "manifest.json").write_text('{"schema_version": 1, "name": ')

    bad_config = write_mlp(repository, "bad_config", 1, seed=10)
    (bad_config.parent / "config.json").write_text('{"batching": {"max_batch": 8}}\n')


def build_reliability_repository(repository: Path) -> Path:
    """The service test packages (mlp 1 and 2, pixels, dtypes, two broken) plus the above."""
    build_test_repository(repository)
    write_slow(repository)
    write_lookup(repository)
    poison = write_lookup(repository, "poison")
    (poison.parent / "config.json").write_text(json.dumps({"batching": POISON_BATCHING}) + "\n")
    write_huge(repository)
    write_faults(repository)
    return repository


SERVING = ("mlp", "pixels", "dtypes", "slow", "lookup", "poison", "huge")
