"""What keeps the one-client tail short (BENCHMARKS.md, Tail latency at one client).

Four things the service owns: the drift monitor's CPU budget (past it a sample is
skipped and counted, and time earns the budget back; a real calibration run,
a test clock); the drift worker runs at SCHED_IDLE, so a
measurement takes only a core nothing else wants (read from the kernel's view
of the thread, /proc/self/task/TID/stat); its calibration session allocates
outside the shared onnxruntime arena, so a deprioritised thread never holds a
lock a serving run waits for (read from the real session's options); and
`freeze_startup_objects` takes the start-up's objects out of the collector's
walks, having freed the reference cycles start-up left (a weak reference to
one is dead afterwards).
"""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from reliability.harness import server_process

from bnfold.service import drift_monitor
from bnfold.service.drift_monitor import DriftConfig, DriftMonitor
from bnfold.service.heap import freeze_startup_objects
from bnfold.service.repository import PackageLocation, read_package
from bnfold.service.sessions import CPU, SessionConfig, load_model

from service_packages import MLP_SEEDS, write_mlp

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux thread policy")
#: /proc/PID/task/TID/stat: the scheduling policy is field 41 (proc(5)), counted from 1
_POLICY_FIELD = 41


def _policy(native_id: int) -> int:
    """A thread's scheduling policy as the kernel reports it (fields after the command)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[_POLICY_FIELD - 3])


@linux_only
def test_the_drift_worker_runs_at_sched_idle_and_only_it() -> None:
    monitor = DriftMonitor(DriftConfig(enabled=True))
    others = set(threading.enumerate())  # an earlier test's worker may still be ending
    monitor.start()
    try:
        worker = next(
            t for t in threading.enumerate() if t.name == "bnfold-drift" and t not in others
        )
        assert worker.native_id is not None
        deadline = 100  # the worker sets its policy first thing; poll briefly for it
        while _policy(worker.native_id) != os.SCHED_IDLE and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert _policy(worker.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(worker.native_id) == os.SCHED_IDLE
        assert _policy(threading.get_native_id()) == os.SCHED_OTHER  # this thread: unchanged
    finally:
        monitor.close()
    worker.join(timeout=30)  # a loaded machine may take a moment
    assert not worker.is_alive()


@pytest.fixture
def schema_2_package(tmp_path: Path) -> PackageLocation:
    repository = tmp_path / "repository"
    path = write_mlp(repository, "mlp", 1, MLP_SEEDS[1], calibration=True)
    return PackageLocation("mlp", 1, path, repository)


def test_the_calibration_session_allocates_outside_the_shared_arena(
    schema_2_package: PackageLocation,
) -> None:
    config = SessionConfig(providers=(CPU,), memory_arena=True)
    model = load_model(read_package(schema_2_package), config)
    assert model.calibration_session is not None
    serving = model.eval_session.get_session_options()
    assert serving.enable_cpu_mem_arena
    assert serving.get_session_config_entry("session.use_env_allocators") == "1"
    calibration = model.calibration_session.get_session_options()
    assert not calibration.enable_cpu_mem_arena
    assert config.for_calibration().intra_op_threads == 1
    # and it still measures: the BN input's mean over a batch is numpy's
    rows = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    outputs = model.calibration_session.run(list(model.calibration_outputs), {"input": rows})
    assert len(outputs) == 3 * len(model.layers)
    assert np.isfinite(outputs[0]).all() and int(outputs[2]) == 4


@pytest.fixture
def unfrozen_afterwards() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_freezing_frees_startup_cycles_then_takes_the_rest_out_of_collections(
    unfrozen_afterwards: None,
) -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    cycle = Node()
    cycle.other = Node()
    cycle.other.other = cycle
    left_behind = weakref.ref(cycle)
    del cycle
    kept = Node()
    tracked_before = len(gc.get_objects())

    frozen = freeze_startup_objects()

    assert left_behind() is None  # collected before the freeze, not kept forever
    # other threads may free frozen objects meanwhile, which lowers the count
    assert frozen >= gc.get_freeze_count() > 0
    assert all(item is not kept for item in gc.get_objects())  # no collection walks it
    assert len(gc.get_objects()) < tracked_before


def test_bnfold_serve_freezes_its_start_up_objects_before_it_is_ready(tmp_path: Path) -> None:
    """`bnfold serve` owns its process: a full collection never walks what start-up built
    (heap.freeze_startup_objects); an app in a test's process does not freeze."""
    write_mlp(tmp_path, "mlp", 1, MLP_SEEDS[1])
    with server_process(tmp_path, "--log-level", "debug") as server:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        frozen = re.search(r"froze (\d+) start-up objects", server.log_text())
    assert frozen is not None and int(frozen.group(1)) > 10_000


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _offer_and_wait(monitor: DriftMonitor, model: object, rows: np.ndarray) -> None:
    monitor.offer(model, {"input": rows})  # type: ignore[arg-type]
    assert monitor.wait_idle(30)


def test_the_drift_monitor_keeps_to_its_cpu_budget(
    schema_2_package: PackageLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its budget a sample is skipped and counted; time earns the budget back."""
    monkeypatch.setattr(drift_monitor, "BUDGET_BURST_SECONDS", 0.0)  # no burst: one run owes
    model = load_model(read_package(schema_2_package), SessionConfig(providers=(CPU,)))
    clock = ManualClock()
    budget = 0.001
    monitor = DriftMonitor(DriftConfig(sample_fraction=1.0, cpu_budget=budget), clock=clock)
    monitor.start()
    try:
        rows = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
        _offer_and_wait(monitor, model, rows)  # measured: its CPU is now owed
        state = monitor.state_of(model)  # type: ignore[arg-type]
        assert (state.sampled, state.dropped) == (1, 0)
        _offer_and_wait(monitor, model, rows)  # no time has passed: over the budget
        assert (state.sampled, state.dropped) == (1, 1)
        assert monitor.report(model)["dropped"] == 1  # type: ignore[arg-type]
        clock.now += 1000.0  # the budget pays 1 s of CPU: more than that run took
        _offer_and_wait(monitor, model, rows)
        assert (state.sampled, state.dropped) == (2, 1)
    finally:
        monitor.close()


def test_no_budget_measures_every_sample(schema_2_package: PackageLocation) -> None:
    model = load_model(read_package(schema_2_package), SessionConfig(providers=(CPU,)))
    monitor = DriftMonitor(DriftConfig(sample_fraction=1.0, cpu_budget=0.0), clock=ManualClock())
    monitor.start()
    try:
        rows = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
        for _ in range(20):
            _offer_and_wait(monitor, model, rows)
        state = monitor.state_of(model)  # type: ignore[arg-type]
        assert (state.sampled, state.dropped) == (20, 0)
        assert monitor.report(model)["samples"] == 20 * 16  # type: ignore[arg-type]
    finally:
        monitor.close()


def test_the_budget_setting_reaches_the_monitor() -> None:
    from bnfold.service.settings import Settings

    assert DriftConfig.from_settings(Settings(drift_cpu_budget=0.02)).cpu_budget == 0.02
    assert Settings.model_fields["drift_cpu_budget"].default == DriftConfig().cpu_budget


def test_samples_queued_before_the_budget_ran_out_are_dropped_by_the_worker(
    schema_2_package: PackageLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drift_monitor, "BUDGET_BURST_SECONDS", 0.0)
    model = load_model(read_package(schema_2_package), SessionConfig(providers=(CPU,)))
    monitor = DriftMonitor(DriftConfig(sample_fraction=1.0, cpu_budget=0.001), clock=ManualClock())
    rows = np.random.default_rng(3).standard_normal((drift_monitor.RUN_ROWS, 8))
    feeds = {"input": rows.astype(np.float32)}  # a full run each: never merged
    monitor.offer(model, feeds)  # type: ignore[arg-type]
    monitor.offer(model, feeds)  # type: ignore[arg-type]  # both queued: nothing spent yet
    monitor.start()
    try:
        assert monitor.wait_idle(30)
        state = monitor.state_of(model)  # type: ignore[arg-type]
        assert (state.sampled, state.dropped) == (2, 1)  # the first run spent the budget
        assert monitor.report(model)["samples"] == drift_monitor.RUN_ROWS  # type: ignore[arg-type]
    finally:
        monitor.close()


def test_one_long_run_stops_monitoring_for_a_bucket_at_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The debt is capped: the budget earns it back within a tenth of the window."""
    monkeypatch.setattr(drift_monitor, "BUDGET_BURST_SECONDS", 0.0)
    clock = ManualClock()
    budget, window = 0.01, 300.0
    monitor = DriftMonitor(DriftConfig(cpu_budget=budget, window_seconds=window), clock=clock)
    monitor._spend(100.0)  # a run no real test can afford, charged as the worker would
    assert monitor._over_budget()
    clock.now += window / 10 + 0.001
    assert not monitor._over_budget()
