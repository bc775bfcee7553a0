"""Warm-up: every session a version serves runs zeros before the version reports READY.

onnxruntime exposes no run counter, so that the runs happen is shown by graphs
that cannot make one: a graph whose Reshape pins the batch to one row loads and
answers one-row requests, but fails the warm-up run of more rows, so the
version is UNAVAILABLE with warm-up on (the reason names the graph and the
rows) and READY with it off. Which rows each graph is warmed at is the plan's
(warmup.py), checked against the batching policy it follows.

The latency test uses `big`, a graph whose run fills a 32 MB intermediate per
row, in a `bnfold serve` process of its own (a fresh process: memory an earlier
server in this one freed would be reused, and nothing would be cold). A cold
run pays for the memory onnxruntime's arena takes from the system; warm-up
pays it in advance. Measured here (2 cores): the first run 2.2-3.1 ms without
warm-up and 0.8-1.2 ms with it, the next runs 0.34 ms.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reliability.harness import server_process

from bnfold.package_format import CALIBRATION_GRAPH, EVAL_GRAPH, TRAIN_GRAPH, ManifestTensor
from bnfold.service.batch_policy import BatchPolicy
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.sessions import SessionConfig
from bnfold.service.settings import Settings
from bnfold.service.warmup import (
    WarmupRun,
    plan_warmup,
    triton_model_warmup,
    zero_feeds,
)

from service_packages import _model, write_dtypes, write_mlp, write_package
from service_server import running_server

CPU = ("CPUExecutionProvider",)
MIB = 1 << 20
WIDTH = 8
#: `big`: floats of the per-row intermediate (32 MB a row).
BIG_ELEMENTS = 1_000_000
#: requests after the first in the latency test, and the compute-time slack (see there)
STEADY_REQUESTS = 20
SLACK_SECONDS = 1e-3


def _tensor(name: str, datatype: str, *shape: int) -> ManifestTensor:
    return ManifestTensor(name=name, datatype=datatype, shape=shape)


# ---------------------------------------------------------------- packages


def reshape_model(rows: int) -> onnx.ModelProto:
    """`x` FP32 [batch, 8] -> Reshape to [rows, 8] -> `y` [batch, 8]; rows -1 keeps the
    batch, a number pins it (the graph then fails any other number of rows)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(np.array([rows, WIDTH], dtype=np.int64), "shape")],
    )
    return _model(graph)


def big_model() -> onnx.ModelProto:
    """`x` FP32 [batch, 8] -> expand to [batch, 8, BIG_ELEMENTS / 8] -> sum -> `y` [batch, 8]:
    y = x * BIG_ELEMENTS / 8, through a 32 MB intermediate per row."""
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["x", "axis"], ["column"]),
            helper.make_node("Shape", ["x"], ["rows_width"]),
            helper.make_node("Concat", ["rows_width", "depth"], ["shape"], axis=0),
            helper.make_node("Expand", ["column", "shape"], ["wide"]),
            helper.make_node("ReduceSum", ["wide", "axis"], ["y"], keepdims=0),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis"),
            numpy_helper.from_array(np.array([BIG_ELEMENTS // WIDTH], dtype=np.int64), "depth"),
        ],
    )
    return _model(graph)


def write_pinned(repository: Path, name: str, pinned: str) -> Path:
    """A package whose `pinned` graph (model.onnx, train.onnx or calibration.onnx) cannot run
    the rows its warm-up runs: model.onnx and train.onnx pinned to one row (warmed at 32
    and 2), calibration.onnx to two (warmed at 1). The other graphs take any batch."""
    graphs = {
        EVAL_GRAPH: reshape_model(1 if pinned == EVAL_GRAPH else -1),
        TRAIN_GRAPH: reshape_model(1 if pinned == TRAIN_GRAPH else -1),
        CALIBRATION_GRAPH: reshape_model(2 if pinned == CALIBRATION_GRAPH else -1),
    }
    return write_package(
        repository,
        name,
        1,
        graphs[EVAL_GRAPH],
        graphs[TRAIN_GRAPH],
        calibration_model=graphs[CALIBRATION_GRAPH],
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warmup") / "repository"
    write_mlp(root, "mlp", 1, seed=1, calibration=True)
    write_dtypes(root)
    for name, pinned in (
        ("pinned_eval", EVAL_GRAPH),
        ("pinned_train", TRAIN_GRAPH),
        ("pinned_calibration", CALIBRATION_GRAPH),
    ):
        write_pinned(root, name, pinned)
    write_package(root, "big", 1, big_model())
    return root


def _registry(repository: Path, **config: bool) -> ModelRegistry:
    registry = ModelRegistry(repository, SessionConfig(providers=CPU, **config))
    registry.load_all()
    return registry


@pytest.fixture(scope="module")
def warmed(repository: Path) -> ModelRegistry:
    return _registry(repository)


@pytest.fixture(scope="module")
def cold(repository: Path) -> ModelRegistry:
    return _registry(repository, warmup=False)


def _entry(registry: ModelRegistry, name: str) -> tuple[ModelState, str]:
    [entry] = [entry for entry in registry.index() if entry.name == name]
    return entry.state, entry.reason


# ---------------------------------------------------------------- the plan


def test_the_plan_follows_the_batching_policy() -> None:
    """model.onnx at max_batch_size, each preferred size and 1 row (the merged runs' sizes,
    largest first), train.onnx at compare's smallest batch, calibration.onnx at 1 row when
    it is open."""
    inputs = [_tensor("x", "FP32", -1, WIDTH)]
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2, 4))
    assert plan_warmup(policy, inputs, calibration=True, max_bytes=MIB) == (
        WarmupRun(EVAL_GRAPH, 8),
        WarmupRun(EVAL_GRAPH, 4),
        WarmupRun(EVAL_GRAPH, 2),
        WarmupRun(EVAL_GRAPH, 1),
        WarmupRun(TRAIN_GRAPH, 2),
        WarmupRun(CALIBRATION_GRAPH, 1),
    )
    unbatched = BatchPolicy(max_batch_size=8, disabled_reason="max_batch_size is 1")
    assert plan_warmup(unbatched, inputs, calibration=False, max_bytes=MIB) == (
        WarmupRun(EVAL_GRAPH, 1),
        WarmupRun(TRAIN_GRAPH, 2),
    )
    fixed = [_tensor("x", "FP32", 2, WIDTH)]  # no batch axis: each graph once, as declared
    assert plan_warmup(BatchPolicy(), fixed, calibration=False, max_bytes=MIB) == (
        WarmupRun(EVAL_GRAPH, 1),
        WarmupRun(TRAIN_GRAPH, 1),
    )


def test_no_run_takes_more_input_than_the_largest_request_body() -> None:
    """4000 bytes a row and a 10 kB bound: two rows fit, so max_batch_size 8 is warmed at 2
    (and train.onnx at 2); a row above the bound is not warmed at all (no request can bring
    one), whatever its size: 10**12 floats are never allocated."""
    wide = [_tensor("x", "FP32", -1, 1000)]
    policy = BatchPolicy(max_batch_size=8)
    assert plan_warmup(policy, wide, calibration=True, max_bytes=10_000) == (
        WarmupRun(EVAL_GRAPH, 2),
        WarmupRun(EVAL_GRAPH, 1),
        WarmupRun(TRAIN_GRAPH, 2),
        WarmupRun(CALIBRATION_GRAPH, 1),
    )
    assert plan_warmup(policy, wide, calibration=True, max_bytes=3_999) == ()
    huge = [_tensor("x", "FP32", -1, 10**12)]
    assert plan_warmup(policy, huge, calibration=False, max_bytes=64 * MIB) == ()
    fixed = [_tensor("x", "FP64", 2, 1000)]  # 16 kB as declared
    assert plan_warmup(policy, fixed, calibration=False, max_bytes=10_000) == ()


def test_zero_feeds_take_each_inputs_datatype_and_shape() -> None:
    """The batch axis at the rows, any other -1 at 1, a fixed dimension as declared."""
    inputs = [
        _tensor("a", "FP64", -1, 3),
        _tensor("b", "INT32", -1, -1),
        _tensor("c", "BOOL", -1),
        _tensor("d", "FP16", 2, -1, 5),
    ]
    feeds = zero_feeds(inputs, 4)
    expected = {
        "a": (np.float64, (4, 3)),
        "b": (np.int32, (4, 1)),
        "c": (np.bool_, (4,)),
        "d": (np.float16, (2, 1, 5)),
    }
    assert list(feeds) == list(expected)
    for name, (dtype, shape) in expected.items():
        assert feeds[name].dtype == np.dtype(dtype) and feeds[name].shape == shape, name
        assert not feeds[name].any(), name


def test_triton_model_warmup_describes_the_model_onnx_runs() -> None:
    """One entry per model.onnx run; the config's max_batch_size is 0, so Triton's batch_size
    is 1 and the rows are in the dims."""
    inputs = [_tensor("x", "FP32", -1, WIDTH), _tensor("n", "INT64", -1)]
    runs = (WarmupRun(EVAL_GRAPH, 1), WarmupRun(EVAL_GRAPH, 16), WarmupRun(TRAIN_GRAPH, 2))
    assert triton_model_warmup(runs, inputs) == [
        {
            "name": f"zeros_{rows}_rows",
            "batch_size": 1,
            "count": 1,
            "inputs": {
                "x": {"data_type": "TYPE_FP32", "dims": [rows, WIDTH], "zero_data": True},
                "n": {"data_type": "TYPE_INT64", "dims": [rows], "zero_data": True},
            },
        }
        for rows in (1, 16)
    ]


# ---------------------------------------------------------------- the registry


def test_every_session_is_warmed_before_the_version_is_ready(warmed: ModelRegistry) -> None:
    model = warmed.get("mlp")
    assert model.calibration_session is not None
    assert model.warmup == plan_warmup(
        model.batching, model.inputs, calibration=True, max_bytes=warmed.config.warmup_max_bytes
    )
    assert {run.graph for run in model.warmup} == {EVAL_GRAPH, TRAIN_GRAPH, CALIBRATION_GRAPH}
    assert [run.rows for run in model.warmup if run.graph == EVAL_GRAPH] == [
        model.batching.max_batch_size,
        1,
    ]
    assert model.warmup_seconds > 0
    dtypes = warmed.get("dtypes")  # FP64, INT32, BOOL and FP16 zeros all run
    assert dtypes.warmup == plan_warmup(
        dtypes.batching, dtypes.inputs, calibration=False, max_bytes=warmed.config.warmup_max_bytes
    )


@pytest.mark.parametrize(
    ("name", "graph", "rows"), [("pinned_eval", EVAL_GRAPH, 32), ("pinned_train", TRAIN_GRAPH, 2)]
)
def test_a_graph_failing_its_warm_up_leaves_the_version_unavailable(
    warmed: ModelRegistry, cold: ModelRegistry, name: str, graph: str, rows: int
) -> None:
    state, reason = _entry(warmed, name)
    assert state is ModelState.UNAVAILABLE
    assert reason.startswith(f"{graph} failed its warm-up run on zeros of {rows} rows: ")
    assert _entry(cold, name) == (ModelState.READY, "")  # without warm-up nothing ran
    assert cold.get(name).warmup == ()
    one_row = np.ones((1, WIDTH), dtype=np.float32)
    [answer] = cold.get(name).eval_session.run(None, {"x": one_row})
    np.testing.assert_array_equal(answer, one_row)


def test_the_warmed_rows_follow_the_server_batch_size(repository: Path) -> None:
    """With max_batch_size 1 (no merging) model.onnx is warmed at one row only, which the
    pinned graph can run: the version is served."""
    registry = ModelRegistry(repository, SessionConfig(providers=CPU), BatchPolicy(1))
    registry.load("pinned_eval")
    model = registry.get("pinned_eval")
    assert [run.rows for run in model.warmup if run.graph == EVAL_GRAPH] == [1]


def test_a_calibration_graph_failing_its_warm_up_only_stops_drift_monitoring(
    warmed: ModelRegistry, cold: ModelRegistry
) -> None:
    model = warmed.get("pinned_calibration")
    assert model.calibration_session is None and model.calibration_outputs == ()
    assert model.calibration_reason.startswith(
        f"{CALIBRATION_GRAPH} failed its warm-up run on zeros of 1 row: "
    )
    assert CALIBRATION_GRAPH not in {run.graph for run in model.warmup}
    assert cold.get("pinned_calibration").calibration_session is not None


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def big_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big") / "repository"
    write_package(root, "big", 1, big_model())
    return root


@pytest.fixture
def warm_server(big_repository: Path) -> Iterator[str]:
    """`bnfold serve` of `big`, warm-up on (the default); max_batch_size 2 keeps the warm-up
    at 2 and 1 rows."""
    with server_process(big_repository, "--no-grpc", "--max-batch-size", "2") as server:
        assert "warmed up big version 1 in " in server.log_text()
        yield server.url


def _compute_seconds(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("bnfold_compute_duration_seconds_sum{") and 'model="big"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_with_warm_up_the_first_request_runs_as_fast_as_the_next(warm_server: str) -> None:
    """The first request's session run within 2x the median of the next ones, plus 1 ms:
    what remains of a first run after warm-up (0.5-0.8 ms measured) and a busy machine's
    scheduling; without warm-up the first run takes 2 ms more. Each request's run time is
    the growth of the compute histogram's sum, the requests one at a time."""
    rng = np.random.default_rng(16)
    runs = []
    with httpx.Client(base_url=warm_server, timeout=30) as client:
        before = _compute_seconds(client)
        for _ in range(STEADY_REQUESTS + 1):
            # small integers: every partial sum is an integer below 2**24, exact in float32
            batch = rng.integers(-4, 5, size=(1, WIDTH)).astype(np.float32)
            body = {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, WIDTH],
                        "datatype": "FP32",
                        "data": batch.ravel().tolist(),
                    }
                ]
            }
            response = client.post("/v2/models/big/infer", json=body)
            assert response.status_code == 200, response.text
            [output] = response.json()["outputs"]
            expected = batch.astype(np.int64) * (BIG_ELEMENTS // WIDTH)
            np.testing.assert_array_equal(output["data"], expected.ravel())
            after = _compute_seconds(client)
            runs.append(after - before)
            before = after
    steady = statistics.median(runs[1:])
    assert runs[0] <= 2 * steady + SLACK_SECONDS, (runs[0], steady)


def test_the_server_logs_each_version_warm_up(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bnfold.service")
    with running_server(Settings(repository=repository, device="cpu")) as server:
        index = httpx.post(f"{server.url}/v2/repository/index").json()
    states = {entry["name"]: entry["state"] for entry in index}
    assert states["mlp"] == "READY" and states["pinned_eval"] == "UNAVAILABLE"
    lines = [record.getMessage() for record in caplog.records]
    [mlp] = [line for line in lines if line.startswith("warmed up mlp version 1 in ")]
    assert mlp.endswith(
        ": model.onnx at batch 32, 1; train.onnx at batch 2; calibration.onnx at batch 1"
    )


def test_the_warmup_setting_off_skips_it(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--no-warmup: no warm-up line, and the pinned package (which fails its warm-up) serves
    one-row requests."""
    caplog.set_level(logging.INFO, logger="bnfold.service")
    settings = Settings(repository=repository, device="cpu", warmup=False)
    with running_server(settings) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/v2/models/pinned_eval/ready").status_code == 200
        row = [0.5 * index for index in range(WIDTH)]
        body = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": row}]}
        response = client.post("/v2/models/pinned_eval/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == row
    assert not [record for record in caplog.records if "warmed up" in record.getMessage()]
