"""The limit no server can pass: onnxruntime called in this process, at its best batch
size and threading, and its batch-1 latency."""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .harness import input_shape
from .results import InProcess


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _throughput(
    session: ort.InferenceSession, batch: np.ndarray, runs: int, seconds: float
) -> float:
    """Samples a second with `runs` threads calling `session` concurrently."""
    session.run(None, {"input": batch})
    counts = [0] * runs
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < deadline:
            session.run(None, {"input": batch})
            counts[index] += 1

    threads = [threading.Thread(target=loop, args=(index,)) for index in range(runs)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) * len(batch) / (time.perf_counter() - started)


def _latency_ms(session: ort.InferenceSession, sample: np.ndarray, seconds: float) -> float:
    session.run(None, {"input": sample})
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        started = time.perf_counter()
        session.run(None, {"input": sample})
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


_LAYOUT = "{runs} run(s) x {threads} thread(s)"
_LAYOUT_PATTERN = re.compile(r"(\d+) run\(s\) x (\d+) thread\(s\)")


class LimitProbe:
    """`in_process`'s best layout and batch, and the service's batch-1 threading, measured
    again on demand: what a side-by-side round sets beside the server's turns."""

    def __init__(self, repository: Path, model: str, limit: InProcess) -> None:
        path = repository / model / "1" / "model.onnx"
        shape = input_shape(repository, model)
        found = _LAYOUT_PATTERN.fullmatch(limit.best_layout)
        assert found, limit.best_layout
        self._runs, threads = int(found[1]), int(found[2])
        rng = np.random.default_rng(2)
        self._best = _session(path, threads)
        self._batch = rng.random((limit.best_batch, *shape[1:]), dtype=np.float32)
        self._single = _session(path, len(os.sched_getaffinity(0)))
        self._sample = rng.random(shape, dtype=np.float32)

    def best_samples_per_s(self, seconds: float) -> float:
        return _throughput(self._best, self._batch, self._runs, seconds)

    def batch1_p50_ms(self, seconds: float) -> float:
        """On every core, as `bnfold serve` runs one request by default."""
        return _latency_ms(self._single, self._sample, seconds)


def in_process(repository: Path, model: str, seconds: float) -> InProcess:
    """The limit: the best samples/s over batch sizes and threading, and batch-1 latency."""
    path = repository / model / "1" / "model.onnx"
    shape = input_shape(repository, model)
    cores = len(os.sched_getaffinity(0))
    batches = (1, 2, 4, 8, 16) if np.prod(shape) > 10_000 else (1, 8, 64, 256, 1024)
    rng = np.random.default_rng(1)
    by_batch: dict[str, dict[int, float]] = {}
    for threads, runs in ((cores, 1), (1, cores)):
        session = _session(path, threads)
        layout = _LAYOUT.format(runs=runs, threads=threads)
        by_batch[layout] = {
            batch: _throughput(
                session, rng.random((batch, *shape[1:]), dtype=np.float32), runs, seconds
            )
            for batch in batches
        }
    layout, batch = max(
        ((layout, batch) for layout, rates in by_batch.items() for batch in rates),
        key=lambda key: by_batch[key[0]][key[1]],
    )
    sample = rng.random(shape, dtype=np.float32)
    p50 = {threads: _latency_ms(_session(path, threads), sample, seconds) for threads in (1, cores)}
    return InProcess(by_batch[layout][batch], batch, layout, p50, by_batch)
