"""What keeps the one-client tail short (BENCHMARKS.md, Tail latency at one client).

Three things the service owns: the drift worker runs at SCHED_IDLE, so a
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
