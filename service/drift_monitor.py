"""The drift monitor: sample inference requests, measure their BatchNorm inputs off the hot path.

    infer (event loop) ──► offer(model, feeds): credit += fraction; at 1, a sample
                             │  (no lock, no RNG; a full queue drops and counts)
                             ▼
          bounded queue of sampled requests (items and bytes)
                             │
          worker thread ─────┴─► calibration.onnx (1 intra-op thread) on the queued
                                  samples, merged per bucket and shape (at most
                                  every GATHER_SECONDS once the queue is empty),
                                  only the `<layer>.input_mean/var/count` outputs
                                     │
                                     ▼
                DriftWindow of the model version (drift.py): per-layer moments
                pooled exactly, in time buckets; read by GET .../drift and /metrics

Sampling is deterministic: each model version keeps a credit that grows by
the sample fraction per request and fires a sample each time it reaches one,
so exactly one request in 1/fraction is measured, at the cost of an addition
and a comparison per request. Only the event loop offers, so the credit and
the queue's producer side need no lock; the worker owns the sessions it runs
and the windows lock themselves. Requests are sampled before the batcher
merges them, so every sample is one client request; merging samples into one
calibration run changes nothing (the eval graph treats rows independently and
the moments pool exactly).

The reservoir (off by default): when `drift_reservoir_samples` > 0, the most
recent sampled input rows of each model version stay in memory (at most that
many rows and `drift_reservoir_bytes`) for a recalibration from live traffic
(`recent_inputs`). It is request data kept after the request ended: the
reason it is opt-in.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from bnfold.bn_statistics import ChannelMoments
from bnfold.service.drift import DriftWindow, drift_report
from bnfold.service.metrics import DriftLayerSeries, DriftSeries
from bnfold.service.runs import RUN_ERRORS
from bnfold.service.sessions import LoadedModel
from bnfold.service.settings import MIB, Settings

logger = logging.getLogger("bnfold.service")

#: Sampled requests waiting for the worker, across models: more are dropped (and counted).
QUEUE_ITEMS: Final = 256
#: Bytes of input those requests may hold.
QUEUE_BYTES: Final = 64 * MIB
#: Most rows, and input bytes, of queued samples merged into one calibration run (a
#: large model's activations grow with the rows: ResNet-18 takes ~13 MB a 224x224 image).
RUN_ROWS: Final = 256
RUN_BYTES: Final = 4 * MIB
#: After a run that emptied the queue, the worker waits this long before the next one, so
#: the samples queued meanwhile share a run: fewer wake-ups of a thread that takes the GIL
#: from the event loop (drift has a window of minutes; a tenth of a second is nothing).
GATHER_SECONDS: Final = 0.1
#: CPU seconds of measurement the monitor may run ahead of its budget (`cpu_budget`): about
#: one ResNet-18 image, or a few hundred digits samples. A burst of light samples is
#: measured whole; a heavy model's samples are held to the budget within seconds of
#: traffic (with 0.1 s, a 6 s burst of one-client ResNet-18 traffic was never held).
BUDGET_BURST_SECONDS: Final = 0.02
#: How long `close` waits for the worker to finish its current run.
CLOSE_TIMEOUT_SECONDS: Final = 30.0

MONITORING_OFF: Final = "drift monitoring is off (--no-drift-monitoring)"


@dataclass(frozen=True)
class DriftConfig:
    """The monitor's settings (`Settings.drift_*`)."""

    enabled: bool = True
    sample_fraction: float = 0.01
    window_seconds: float = 300.0
    kl_threshold: float = 0.1
    metrics_layers: int = 16
    reservoir_samples: int = 0
    reservoir_bytes: int = 128 * MIB
    #: fraction of one core the measurements may use over time; 0: unbounded
    cpu_budget: float = 0.005

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftConfig:
        return cls(
            enabled=settings.drift_monitoring,
            sample_fraction=settings.drift_sample_fraction,
            window_seconds=settings.drift_window_seconds,
            kl_threshold=settings.drift_kl_threshold,
            metrics_layers=settings.drift_metrics_layers,
            reservoir_samples=settings.drift_reservoir_samples,
            reservoir_bytes=settings.drift_reservoir_bytes,
            cpu_budget=settings.drift_cpu_budget,
        )


class Reservoir:
    """The most recent input rows of one model version, within a row and a byte cap."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._entries: deque[dict[str, np.ndarray]] = deque()
        self._rows = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, feeds: dict[str, np.ndarray], rows: int) -> None:
        """Keep `feeds` (one request's inputs, `rows` rows); drop the oldest rows over a cap."""
        with self._lock:
            self._entries.append(feeds)
            self._rows += rows
            self._bytes += _nbytes(feeds)
            while self._entries and (self._rows > self.max_rows or self._bytes > self.max_bytes):
                oldest = self._entries.popleft()
                oldest_rows, oldest_bytes = _rows(oldest), _nbytes(oldest)
                self._rows -= oldest_rows
                self._bytes -= oldest_bytes
                row_bytes = oldest_bytes / oldest_rows
                room = min(
                    self.max_rows - self._rows,
                    int((self.max_bytes - self._bytes) // row_bytes) if row_bytes else oldest_rows,
                )
                if room > 0:  # the newest rows of the oldest request still fit
                    kept = {
                        name: array[oldest_rows - room :].copy() for name, array in oldest.items()
                    }
                    self._entries.appendleft(kept)
                    self._rows += room
                    self._bytes += _nbytes(kept)
                    break

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return self._bytes

    def arrays(self) -> dict[str, np.ndarray]:
        """The kept rows by input name, oldest first; only those shaped like the newest
        (a model with dynamic non-batch axes may see several shapes). Empty when none."""
        with self._lock:
            entries = list(self._entries)
        if not entries:
            return {}
        shape = _signature(entries[-1])
        same = [entry for entry in entries if _signature(entry) == shape]
        return {name: np.concatenate([entry[name] for entry in same]) for name in entries[-1]}


def _rows(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _nbytes(feeds: dict[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in feeds.values())


def _signature(feeds: dict[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    return tuple(array.shape[1:] for array in feeds.values())


@dataclass(eq=False)
class ModelDrift:
    """One model version's monitoring state. `window` is None when it is not monitored,
    with the reason. `credit` and `sampled` change on the event loop only; `dropped`
    on the event loop (a full queue, the CPU budget at sampling) and on the worker (the
    budget spent while the sample waited), `failed` on the worker only: counters,
    read for reports, whose rare lost update under the GIL costs one count."""

    model: LoadedModel
    window: DriftWindow | None
    reason: str
    output_names: tuple[str, ...] = ()
    reservoir: Reservoir | None = None
    credit: float = 0.0
    sampled: int = 0
    dropped: int = 0
    failed: int = 0


@dataclass(eq=False)
class _Sample:
    state: ModelDrift
    feeds: dict[str, np.ndarray]
    rows: int
    at: float
    nbytes: int


_STOP: Final = object()
#: The worker's niceness where SCHED_IDLE is refused: the lowest nice value.
WORKER_NICENESS: Final = 19


def _lowest_priority() -> None:
    """Make the calling thread (the worker) yield the CPU to serving: the cores are shared,
    and a serving run split over all of them waits for whichever of its threads the worker
    displaced, so a measurement run at equal priority cost serving several times its own
    CPU time (BENCHMARKS.md). SCHED_IDLE, not nice 19: a nice-19 thread still gets a
    slice beside a busy serving thread, an idle one only a core nothing else wants. Linux
    schedules threads, so this is the worker's alone (its calibration session runs on one
    intra-op thread: the calling one); neither needs a privilege."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
        except OSError as exc:  # a sandbox may forbid both: measure at normal priority
            logger.warning("drift monitor: cannot lower the worker's priority: %s", exc)


def _own(array: np.ndarray) -> np.ndarray:
    """`array`, copied when it is a view (of a request body it would keep alive)."""
    return array if array.flags.owndata else array.copy()


class DriftMonitor:
    """Sampling on the event loop, measurement on one worker thread, reports on demand."""

    def __init__(self, config: DriftConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._states: dict[int, ModelDrift] = {}  # by id(model): the state holds the model
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._enqueued = 0  # samples queued (event loop)
        self._enqueued_bytes = 0
        self._processed = 0  # samples the worker is done with (worker, under _idle)
        self._released_bytes = 0
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        # (CPU seconds measured beyond the budget, at what time): one tuple, swapped whole
        # by the worker, read by the event loop (`_over_budget`)
        self._debt: tuple[float, float] = (0.0, clock())

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.config.enabled and self._worker is None:
            self._stopping.clear()
            self._worker = threading.Thread(target=self._work, name="bnfold-drift", daemon=True)
            self._worker.start()

    def close(self) -> None:
        """Stop the worker after its current run; what is still queued is discarded. Blocking."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._stopping.set()
            self._queue.put(_STOP)
            worker.join(CLOSE_TIMEOUT_SECONDS)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every sample queued so far is measured (or dropped by a failure);
        False on timeout. For tests and benchmarks: the endpoint reads what is measured."""
        target = self._enqueued
        with self._idle:
            return self._idle.wait_for(lambda: self._processed >= target, timeout)

    # ------------------------------------------------------------ the hot path

    def offer(self, model: LoadedModel, feeds: dict[str, np.ndarray]) -> None:
        """Called per inference request with its checked inputs; samples 1 in 1/fraction."""
        state = self._states.get(id(model))
        if state is None:
            state = self.state_of(model)
        if state.window is None:
            return
        state.credit += self.config.sample_fraction
        if state.credit < 1.0:
            return
        state.credit -= 1.0
        if self._over_budget():
            state.dropped += 1
            return
        self._enqueue(state, feeds)

    def _over_budget(self) -> bool:
        """Whether the measurements have used more CPU than `cpu_budget` of one core since
        the monitor started, beyond a burst (event loop, once per sample).

        The worker runs at the lowest priority, so it never takes a core from serving,
        but a heavy model's calibration run still slows the serving runs beside it
        (caches and memory bandwidth are shared): at one client, ResNet-18's p99 rose
        from 1.36x to 1.54x its median with one request in 100 measured (BENCHMARKS.md,
        tail latency). The budget bounds that for any model and traffic; a light model's
        sampling never reaches it."""
        budget = self.config.cpu_budget
        if not budget:
            return False
        debt, since = self._debt
        return debt - budget * (self.clock() - since) > BUDGET_BURST_SECONDS

    def _spend(self, cpu_seconds: float) -> None:
        """Charge a measurement's CPU to the budget (worker).

        The debt is capped at the burst plus what the budget earns in a tenth of the
        window (one of its time buckets): one long run may overshoot the budget, but
        never stops the monitoring of every model for longer than that."""
        budget = self.config.cpu_budget
        debt, since = self._debt
        now = self.clock()
        debt = max(0.0, debt - budget * (now - since)) + cpu_seconds
        ceiling = BUDGET_BURST_SECONDS + budget * self.config.window_seconds / 10
        self._debt = (min(debt, ceiling), now)

    def _enqueue(self, state: ModelDrift, feeds: dict[str, np.ndarray]) -> None:
        rows = _rows(feeds)
        if rows == 0:
            return
        size = _nbytes(feeds)
        pending_bytes = self._enqueued_bytes - self._released_bytes
        if self._queue.qsize() >= QUEUE_ITEMS or pending_bytes + size > QUEUE_BYTES:
            state.dropped += 1
            return
        owned = {name: _own(array) for name, array in feeds.items()}
        state.sampled += 1
        self._enqueued += 1
        self._enqueued_bytes += size
        self._queue.put(_Sample(state, owned, rows, self.clock(), size))

    # ------------------------------------------------------------ model versions

    def state_of(self, model: LoadedModel) -> ModelDrift:
        """`model`'s state, made on first use (event loop only)."""
        state = self._states.get(id(model))
        if state is None:
            state = self._states[id(model)] = self._new_state(model)
        return state

    def _new_state(self, model: LoadedModel) -> ModelDrift:
        if not self.config.enabled:
            return ModelDrift(model, None, MONITORING_OFF)
        if model.calibration_session is None:
            return ModelDrift(model, None, model.calibration_reason)
        if not model.layers:
            return ModelDrift(model, None, "the model has no BatchNorm layers to monitor")
        window = DriftWindow(
            [layer.channels for layer in model.layers], self.config.window_seconds, clock=self.clock
        )
        reservoir = (
            Reservoir(self.config.reservoir_samples, self.config.reservoir_bytes)
            if self.config.reservoir_samples
            else None
        )
        return ModelDrift(model, window, "", model.calibration_outputs, reservoir)

    def keep_only(self, models: Iterable[LoadedModel]) -> None:
        """Forget the model versions not in `models` (unloaded, reloaded): their windows,
        reservoirs and metric series go (event loop only)."""
        live = {id(model) for model in models}
        self._states = {key: state for key, state in self._states.items() if key in live}

    def recent_inputs(self, model: LoadedModel) -> dict[str, np.ndarray]:
        """The reservoir's rows of `model` by input name (empty when off or empty)."""
        state = self._states.get(id(model))
        if state is None or state.reservoir is None:
            return {}
        return state.reservoir.arrays()

    # ------------------------------------------------------------ reports

    def report(self, model: LoadedModel, channels: bool = False) -> dict[str, Any]:
        """The drift endpoint's answer for `model` (event loop)."""
        config = self.config
        state = self.state_of(model)
        answer: dict[str, Any] = {
            "model_name": model.name,
            "model_version": str(model.version),
            "available": state.window is not None,
            "sample_fraction": config.sample_fraction,
            "window_seconds": config.window_seconds,
            "kl_threshold": config.kl_threshold,
        }
        if state.window is None:
            return answer | {"reason": state.reason}
        contents = state.window.read()
        layers, verdict = drift_report(
            model.layers, contents.moments, config.kl_threshold, channels
        )
        return answer | {
            "samples": contents.rows,
            "requests_sampled": contents.requests,
            "dropped": state.dropped + state.failed,
            "verdict": verdict,
            "layers": layers,
        }

    def metric_series(self, models: Sequence[LoadedModel]) -> list[DriftSeries]:
        """What /metrics shows of `models` (the ones the registry serves): per version its
        window, and its `metrics_layers` worst layers. Forgets every other version."""
        self.keep_only(models)
        series = []
        for model in models:
            state = self.state_of(model)
            if state.window is None:
                continue
            contents = state.window.read()
            layers, verdict = drift_report(model.layers, contents.moments, self.config.kl_threshold)
            measured = [entry for entry in layers if "kl_divergence" in entry]
            series.append(
                DriftSeries(
                    model.name,
                    str(model.version),
                    contents.rows,
                    verdict["drifted_layers"],
                    state.dropped + state.failed,
                    tuple(
                        DriftLayerSeries(
                            entry["name"],
                            entry["kl_divergence"]["mean"],
                            entry["mean_shift"]["mean"],
                        )
                        for entry in measured[: self.config.metrics_layers]
                    ),
                )
            )
        return series

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        _lowest_priority()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop, drained = self._more(first)
            if self._over_budget():  # samples queued while the last runs spent the budget
                for sample in batch:
                    sample.state.dropped += 1
            else:
                started = time.thread_time()
                try:
                    self._measure(batch)
                except Exception:  # never let the worker die: the next samples still count
                    logger.exception("drift monitor: measuring %d samples failed", len(batch))
                    for sample in batch:
                        sample.state.failed += 1
                self._spend(time.thread_time() - started)
            with self._idle:
                self._processed += len(batch)
                self._released_bytes += sum(sample.nbytes for sample in batch)
                self._idle.notify_all()
            if stop or (drained and self._stopping.wait(GATHER_SECONDS)):
                return

    def _more(self, first: _Sample) -> tuple[list[_Sample], bool, bool]:
        """`first` and what else is queued, up to RUN_ROWS rows or RUN_BYTES (at least
        `first`); whether the stop signal was among them, and whether the queue is empty."""
        batch, rows, size = [first], first.rows, first.nbytes
        while rows < RUN_ROWS and size < RUN_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False, True
            if item is _STOP:
                return batch, True, True
            batch.append(item)
            rows += item.rows
            size += item.nbytes
        return batch, False, False

    def _measure(self, batch: list[_Sample]) -> None:
        """One calibration run per (model version, time bucket, input shapes) group."""
        groups: dict[tuple[int, int, tuple[tuple[int, ...], ...]], list[_Sample]] = {}
        for sample in batch:
            window = sample.state.window
            assert window is not None  # only monitored versions are sampled
            key = (id(sample.state), window.bucket_number(sample.at), _signature(sample.feeds))
            groups.setdefault(key, []).append(sample)
        for group in groups.values():
            self._measure_group(group)

    def _measure_group(self, group: list[_Sample]) -> None:
        state = group[0].state
        window, session = state.window, state.model.calibration_session
        assert window is not None and session is not None
        feeds = (
            group[0].feeds
            if len(group) == 1
            else {
                name: np.concatenate([sample.feeds[name] for sample in group])
                for name in group[0].feeds
            }
        )
        try:
            outputs = session.run(list(state.output_names), feeds)
        except RUN_ERRORS as exc:
            self._failed(state, group, f"calibration.onnx could not run: {exc}")
            return
        moments = [
            ChannelMoments.from_run(mean, var, int(count))
            for mean, var, count in zip(outputs[::3], outputs[1::3], outputs[2::3], strict=True)
        ]
        if not all(np.isfinite(run.mean).all() and np.isfinite(run.m2).all() for run in moments):
            self._failed(state, group, "the input statistics are not finite")
            return
        try:
            window.add(moments, sum(s.rows for s in group), len(group), at=group[0].at)
        except ValueError as exc:  # channels that disagree with the manifest
            self._failed(state, group, str(exc))
            return
        if state.reservoir is not None:
            for sample in group:
                state.reservoir.add(sample.feeds, sample.rows)

    @staticmethod
    def _failed(state: ModelDrift, group: list[_Sample], reason: str) -> None:
        if not state.failed:
            logger.warning(
                "drift monitor: %s version %d: %s (further failures are only counted)",
                state.model.name,
                state.model.version,
                reason,
            )
        state.failed += len(group)
