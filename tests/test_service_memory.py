"""What a loaded session keeps in memory (sessions.py, "Memory"): no copy of its graph
bytes on the CPU, one shared arena, and warm-up runs that shrink it except each graph's
last. Sizes are measured by benchmarks/memory_bench.py; these tests pin the behaviour."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bnfold.package_format import CALIBRATION_GRAPH, EVAL_GRAPH, TRAIN_GRAPH
from bnfold.service.heap import release_free_heap
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.sessions import SessionConfig, open_session, warmup_run_options

from service_packages import mlp_models, mlp_weights, write_mlp

CPU = ("CPUExecutionProvider",)
SHRINK = "memory.enable_memory_arena_shrinkage"


def test_a_cpu_session_keeps_no_reference_to_its_graph_bytes() -> None:
    """onnxruntime's Python class would keep the bytes for its provider fallback; the
    service's CPU sessions drop them, and still answer as a session on the file does."""
    eval_model, _ = mlp_models(mlp_weights(3))
    graph = eval_model.SerializeToString()
    references = sys.getrefcount(graph)
    session = open_session(graph, {}, SessionConfig(providers=CPU))
    assert sys.getrefcount(graph) == references
    reference = ort.InferenceSession(graph, providers=list(CPU))
    [tensor] = session.get_inputs()
    rows = np.random.default_rng(3).normal(size=(4, *tensor.shape[1:])).astype(np.float32)
    for got, want in zip(
        session.run(None, {tensor.name: rows}),
        reference.run(None, {tensor.name: rows}),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)  # the same graph and kernels: bit-identical


def test_warm_up_shrinks_the_shared_cpu_arena_only_when_there_is_one() -> None:
    options = warmup_run_options(SessionConfig(providers=CPU))
    assert options is not None and options.get_run_config_entry(SHRINK) == "cpu:0"
    assert warmup_run_options(SessionConfig(providers=CPU, memory_arena=False)) is None
    cuda = ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert warmup_run_options(SessionConfig(providers=cuda)) is None


def test_warm_up_with_shrinks_leaves_every_graph_ready_on_the_shared_arena(
    tmp_path: Path,
) -> None:
    """The whole plan (32 and 1 rows on model.onnx, then train.onnx and calibration.onnx)
    runs with its shrink options; the version is READY and answers a batch of 32 as a
    session of its own does."""
    write_mlp(tmp_path, "mlp", 1, seed=5, calibration=True)
    registry = ModelRegistry(tmp_path, SessionConfig(providers=CPU))
    [entry] = registry.load_all()
    assert entry.state is ModelState.READY, entry.reason
    model = entry.model
    assert model is not None and model.calibration_session is not None
    assert [(run.graph, run.rows) for run in model.warmup] == [
        (EVAL_GRAPH, 32),
        (EVAL_GRAPH, 1),
        (TRAIN_GRAPH, 2),
        (CALIBRATION_GRAPH, 1),
    ]
    [tensor] = model.inputs
    rows = np.random.default_rng(5).normal(size=(32, *tensor.shape[1:])).astype(np.float32)
    eval_outputs = model.eval_session.run(None, {tensor.name: rows})
    fresh = open_session(
        (tmp_path / "mlp" / "1" / EVAL_GRAPH).read_bytes(), {}, SessionConfig(providers=CPU)
    )
    np.testing.assert_array_equal(eval_outputs[0], fresh.run(None, {tensor.name: rows})[0])


def test_releasing_the_free_heap_leaves_the_sessions_working() -> None:
    eval_model, _ = mlp_models(mlp_weights(7))
    session = open_session(eval_model.SerializeToString(), {}, SessionConfig(providers=CPU))
    [tensor] = session.get_inputs()
    rows = np.ones((2, *tensor.shape[1:]), dtype=np.float32)
    before = session.run(None, {tensor.name: rows})[0]
    release_free_heap()
    np.testing.assert_array_equal(session.run(None, {tensor.name: rows})[0], before)
