"""Dynamic batching (Triton's idea): requests for one model version share session runs.

    submit (event loop) ──► queue of (model, version) ──► run thread: its turn to run,
      │  (full: 503 + Retry-After,          the oldest request, then up to
      │   at once)                          max_queue_delay_us for more rows
      │                                                   │
      │                  [a a][b][c c c] ── concatenate on axis 0, one run
      │                                                   │
      ◄── each caller: exactly its rows, its outputs ─────┘ (back on the event loop)

One `ModelQueue` per loaded model version. Its run threads pull the work: a
thread that finishes a run takes whatever queued meanwhile, up to
`max_batch_size` rows, so under load requests pile up while runs are busy and
the next batch is larger (as in Triton), and a busy thread never has to be
woken. That matters for small models: handing each batch to a sleeping
executor thread (a futex wake-up, a context switch, the GIL changing hands)
measured as the largest single cost of a digits-MLP request (BENCHMARKS.md).
The concurrent runs (`Settings.concurrent_runs`) are shared by every model,
so models never oversubscribe the cores between them.

Only requests whose inputs agree on every dimension but the first are merged
(the datatypes are fixed by the manifest); the run asks for the union of the
outputs the merged requests selected. A request with more rows than
`max_batch_size` runs alone. With preferred batch sizes (a load's Triton
config), a run takes the largest preferred size the queued rows fill and does
not wait for more (`BatchPolicy.batch_ready`, `batch_limit` decide). With
batching off (`BatchPolicy`), each request is a run of its own, still through
the bounded queue.

Failure isolation: when a merged run fails, every request in it is run again
alone, so only the request that cannot run gets its error (422).

Cancellation: a caller cancelled while its request waits (the client went
away) takes the request out of the queue at once (`withdraw`): it never runs,
never counts against `max_queue_size`, and a batch gathering rows never waits
for it. A request already taken by a run thread runs with its batch; its
answer is dropped.

Tiny models run inline: handing a run to a run thread and its outcome back
(a futex wake-up, the GIL changing hands twice, `call_soon_threadsafe` waking
the event loop) costs the process INLINE_RUN_NS or more of CPU, several times a
batch-1 run of the digits MLP (BENCHMARKS.md). So a request whose run the
version's running estimate (`RunEstimate`: its inline runs' cost once it has
some, else its run-thread runs') puts under that cost is run on the event loop
itself, when nothing of that version is queued or running, no gathering delay is asked for, and a run slot of
`concurrent_runs` is free at once (an inline run holds one like any run). A
run estimated at up to 4x that cost still runs inline once in 32 requests, to
measure it where the decision is about (`RunEstimate.inline`). An
inline run has no await: nothing can queue behind it or cancel it while it
runs, and its outcome, metrics and statistics are those of a run of one
request. Everything else, and every model whose runs take longer, stays on the
run threads, so under load requests still queue and merge there.

Threads: the queue is shared under a lock; the event loop appends, run threads
take. Futures, metrics and statistics are only touched on the event loop (a
finished run hands its outcomes back with `call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue

import numpy as np

from bnfold.service.errors import QueueFull, Unavailable
from bnfold.service.metrics import ServiceMetrics
from bnfold.service.runs import RUN_ERRORS, run_failed
from bnfold.service.sessions import LoadedModel, SessionRun, session_runner
from bnfold.service.statistics import Execution

logger = logging.getLogger("bnfold.service")

Outcome = tuple[list[np.ndarray], Execution] | Exception


# One request's answer: its outputs, its wait in the queue (ns), the run that served it.
Served = tuple[list[np.ndarray], int, Execution]

#: A run the estimate puts under this many nanoseconds runs on the event loop: the
#: process CPU that handing a run to a run thread and back costs, measured (module docstring).
INLINE_RUN_NS = 40_000


class RunMean:
    """An exponential mean of one kind of run's nanoseconds and rows.

    It follows a faster run at once (half way) and a slower one slowly (by
    `slower` of at most twice the mean): a first run on a cold thread took
    200 µs where the next ones took 10, and a run the machine preempted or that
    waited for the GIL is not the model's cost either. A model whose runs are
    slow still becomes slow in it, by `slower` of the mean a run. A run of
    `rows` rows is expected to cost the mean run, times rows / mean rows when it
    has more: never less than a run of the rows the mean came from, so a model
    with a large cost per run is not taken for cheap by its merged runs' cost
    per row.
    """

    __slots__ = ("ns", "rows", "slower")
    FASTER = 0.5  # weight of a run faster than the mean
    MOST_SLOWER = 2.0  # a slower run counts as at most this many times the mean

    def __init__(self, slower: float = 0.125) -> None:
        self.ns: float | None = None  # no run yet: nothing is known
        self.rows = 1.0
        self.slower = slower  # weight of a slower run

    def observe(self, ns: float, rows: int) -> None:
        known = self.ns
        if known is None:
            self.ns, self.rows = ns, rows
            return
        if ns < known:
            weight = self.FASTER
        else:
            weight, ns = self.slower, min(ns, self.MOST_SLOWER * known)
        self.ns = known + weight * (ns - known)
        self.rows += weight * (rows - self.rows)

    def expected(self, rows: int) -> float | None:
        known = self.ns
        return None if known is None else known * max(1.0, rows / max(1.0, self.rows))


class RunEstimate:
    """A version's estimate of what a run costs the event loop; event loop only.

    Two means (`RunMean`) of the calling thread's CPU in session.run
    (`Execution.infer_cpu_ns`; the wall time includes waiting for the GIL after
    the run, which made a 4 µs run look like 35, and under load the time the
    thread was preempted: inline runs of 9 µs of CPU took 25-320 µs of wall time
    at 8 clients): of the runs made inline, and of the runs made on run threads.
    The decision goes by the inline runs' mean once there is one: run-thread runs
    cost more than the same rows on the loop (the thread slept between requests
    and its caches went cold), and under load they are merged runs: at 8 clients
    the digits MLP's 8-row runs measured 60-140 µs of CPU on the run threads, and
    one mean of both kept most requests off the loop (BENCHMARKS.md, the
    tiny-model gap). Reading a thread's CPU clock is a system call (0.5 µs, twice
    a run, against a 9 µs run), so an inline run reads it only when it explores,
    while the loop's mean is unknown, and every `MEASURE_EVERY`-th run.
    """

    __slots__ = ("declined", "exploring", "loop", "thread", "unmeasured")
    #: A run expected between the limit and this many times it still runs inline once in
    #: `EXPLORE_EVERY` such requests (`inline`).
    EXPLORE_FACTOR = 4.0
    EXPLORE_EVERY = 32
    MEASURE_EVERY = 8
    #: The loop's mean follows slower runs by a 32nd: at one client the digits MLP's
    #: inline runs measured 15, 22 and 83 µs of CPU at the 10th, 50th and 90th
    #: percentiles (the loop sleeps between requests and its caches go cold), and a
    #: mean that followed by an eighth hovered about the limit, sending half the
    #: requests to the run threads. Under the limit a run costs the loop less than the
    #: hand-off at the median; a model slower than the limit still gets there, by a
    #: 32nd of the mean a measured run.
    LOOP_SLOWER = 1 / 32

    def __init__(self) -> None:
        self.loop = RunMean(self.LOOP_SLOWER)  # inline runs
        self.thread = RunMean()  # runs on run threads
        self.declined = 0  # requests kept off the loop since the last exploring run
        self.exploring = False  # whether the last inline decision was an exploring one
        self.unmeasured = 0  # inline runs since the last one that read the CPU clock

    def observe(self, execution: Execution, inline: bool) -> None:
        """Count a run (0 CPU nanoseconds: an inline run that did not read the clock)."""
        ns = execution.infer_cpu_ns
        if not ns:
            return
        if not inline:
            self.thread.observe(ns, execution.rows)
            return
        if self.loop.ns is None and self.thread.ns is not None:
            # the first inline run meets cold caches: at one client the digits MLP's took
            # 61 µs where the next ones took 15-30, and kept it off the loop for 900 requests
            ns = min(ns, self.thread.ns)
        self.loop.observe(ns, execution.rows)

    def measures(self) -> bool:
        """Whether the inline run about to start should read the thread's CPU clock; an
        exploring decision counts as taken only here, as its run starts."""
        self.unmeasured += 1
        if self.exploring:
            self.declined = 0
        elif self.loop.ns is not None and self.unmeasured < self.MEASURE_EVERY:
            return False
        self.unmeasured = 0
        return True

    def inline(self, rows: int, limit_ns: float) -> bool:
        """Whether a run of `rows` rows should run inline: expected to take less than
        `limit_ns`, or less than `EXPLORE_FACTOR` times it and the `EXPLORE_EVERY`-th such
        request since the last one that did.

        Why explore: with no inline run yet, the run threads' mean is all there is, and
        it overstates the loop's cost (class docstring); a slow or busy machine doubles
        both. The digits MLP's runs measured 40-80 µs on run threads on a loaded CI
        machine, so no run went inline in 1,000 requests. One run in 32 on the loop
        measures the run where the decision is about; it costs the loop at most 4x the
        limit when it is not cheap after all, and then the runs stay on the threads."""
        expected = self.loop.expected(rows)
        if expected is None:
            expected = self.thread.expected(rows)
            if expected is None:
                return False
        self.exploring = False
        if expected < limit_ns:
            return True
        if expected >= limit_ns * self.EXPLORE_FACTOR:
            return False
        self.declined += 1
        if self.declined < self.EXPLORE_EVERY:
            return False
        self.exploring = True  # until it runs (`measures`): the queue may turn it away
        return True


def _rows(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


@dataclass(eq=False)
class _Pending:
    """One queued request: validated feeds (manifest input order) and the caller's future."""

    feeds: dict[str, np.ndarray]
    output_names: tuple[str, ...]
    rows: int
    signature: tuple[tuple[int, ...], ...]
    enqueued: float
    future: asyncio.Future[Served]


@dataclass(frozen=True)
class _RunResult:
    started: float
    finished: float
    rows: int
    outcomes: list[Outcome]
    executions: list[Execution]  # the runs that succeeded


def _run_alone(
    run: SessionRun,
    model_name: str,
    feeds: dict[str, np.ndarray],
    output_names: Sequence[str],
    rows: int,
    measured: bool = True,
) -> Outcome:
    """One request's run; the calling thread's CPU in it read only when `measured` (an
    inline run reads it when `RunEstimate.measures` says so), else 0."""
    started = time.perf_counter_ns()
    cpu_started = time.thread_time_ns() if measured else 0
    try:
        outputs = run(output_names, feeds, None)
    except RUN_ERRORS as exc:
        return run_failed(model_name, exc)
    cpu_ns = time.thread_time_ns() - cpu_started if measured else 0
    return outputs, Execution(rows, 0, time.perf_counter_ns() - started, 0, cpu_ns)


def _run_merged(
    run: SessionRun, model_name: str, batch: list[_Pending], names: list[str]
) -> list[Outcome] | None:
    """One run on the concatenated batch, split back per request; None if it cannot be used."""
    merging = time.perf_counter_ns()
    feeds = {
        name: np.concatenate([request.feeds[name] for request in batch]) for name in batch[0].feeds
    }
    rows = sum(request.rows for request in batch)
    running = time.perf_counter_ns()
    cpu_started = time.thread_time_ns()
    try:
        outputs = run(names, feeds, None)
    except RUN_ERRORS:
        return None
    cpu_ns = time.thread_time_ns() - cpu_started
    splitting = time.perf_counter_ns()
    if any(output.ndim == 0 or output.shape[0] != rows for output in outputs):
        logger.warning("%s: outputs of a merged run are not batch-major; running alone", model_name)
        return None
    position = {name: index for index, name in enumerate(names)}
    split: list[list[np.ndarray]] = []
    offset = 0
    for request in batch:
        end = offset + request.rows
        split.append([outputs[position[name]][offset:end] for name in request.output_names])
        offset = end
    execution = Execution(
        rows, running - merging, splitting - running, time.perf_counter_ns() - splitting, cpu_ns
    )
    return [(request_outputs, execution) for request_outputs in split]


def run_batch(
    run: SessionRun, model_name: str, batch: list[_Pending], names: list[str]
) -> _RunResult:
    """On a run thread: run `batch` (merged when it has several requests), one outcome each."""
    started = time.perf_counter()
    outcomes = _run_merged(run, model_name, batch, names) if len(batch) > 1 else None
    if outcomes is None:
        outcomes = [
            _run_alone(run, model_name, request.feeds, request.output_names, request.rows)
            for request in batch
        ]
    rows = sum(request.rows for request in batch)
    executions: list[Execution] = []
    for outcome in outcomes:
        if not isinstance(outcome, Exception) and (
            not executions or outcome[1] is not executions[-1]
        ):
            executions.append(outcome[1])
    return _RunResult(started, time.perf_counter(), rows, outcomes, executions)


class RunSlots:
    """`concurrent_runs` slots shared by every model's runs: a run holds one while it runs.

    A queue of slot tokens rather than a `threading.BoundedSemaphore`, whose
    acquire and release are Python code around a condition (1 µs a pair against
    0.06): an inline run takes and gives back a slot on every request.
    """

    __slots__ = ("_free",)

    def __init__(self, count: int) -> None:
        self._free: SimpleQueue[int] = SimpleQueue()
        for slot in range(count):
            self._free.put(slot)

    def take(self) -> int | None:
        """A free slot now, or None."""
        try:
            return self._free.get_nowait()
        except Empty:
            return None

    def wait(self) -> int:
        """A slot, once one is free (a run thread)."""
        return self._free.get()

    def give(self, slot: int) -> None:
        self._free.put(slot)


class ModelQueue:
    """The queue of one loaded model version and the threads that run it."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: ServiceMetrics,
        run_slots: RunSlots,
        threads: int,
    ) -> None:
        self.model = model
        self.policy = model.batching
        self._loop = asyncio.get_running_loop()
        self._run_slots = run_slots
        self._run = session_runner(model.eval_session)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._running = 0  # runs of this version on run threads now
        self._gathering = False
        self._retired = False
        self._output_order = [tensor.name for tensor in model.outputs]
        self._queue_time = metrics.queue.labels(model.name)
        self._compute_time = metrics.compute.labels(model.name, "eval")
        self._run_rows = metrics.run_batch_size.labels(model.name)
        self._run_requests = metrics.run_requests.labels(model.name)
        self._statistics = metrics.statistics.of(model)
        self._inline_runs = metrics.inline_runs.labels(model.name)
        self._estimate = RunEstimate()
        # a gathering delay asks requests to wait for company: then every run waits for it
        self._may_run_inline = not (self.policy.batching and self.policy.max_queue_delay_us)
        for index in range(threads):
            threading.Thread(
                target=self._serve,
                name=f"bnfold-run-{model.name}-{model.version}-{index}",
                daemon=True,
            ).start()

    # ------------------------------------------------------------ event loop side

    def check_room(self) -> None:
        """Raise `QueueFull` when `max_queue_size` requests are waiting."""
        if len(self._pending) >= self.policy.max_queue_size:
            raise QueueFull(
                f"{self.model.name} version {self.model.version} has "
                f"{len(self._pending)} requests queued (max_queue_size); retry later"
            )

    def submit(
        self, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> asyncio.Future[Served]:
        """Queue one validated request; raises `QueueFull` when `max_queue_size` are waiting."""
        self.check_room()
        future: asyncio.Future[Served] = self._loop.create_future()
        rows = _rows(feeds)
        signature = tuple(array.shape[1:] for array in feeds.values())
        request = _Pending(feeds, tuple(output_names), rows, signature, time.perf_counter(), future)
        with self._lock:
            self._pending.append(request)
            self._pending_rows += rows
            # A futex wake-up only when a run thread is waiting, and not for a thread that
            # waits for company until the batch is full or its deadline passes.
            if not self._gathering or self.policy.batch_ready(self._pending_rows):
                self._arrived.notify()
        return future

    def run_inline(
        self, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> Served | None:
        """Run a request right here on the event loop when that is cheaper than a run thread
        (module docstring); None when it is not, and the request must be `submit`ted.

        Raises the run's error (`Unprocessable`) as a run thread's outcome would."""
        rows = _rows(feeds)
        if not (self._may_run_inline and self._estimate.inline(rows, INLINE_RUN_NS)):
            return None
        with self._lock:
            if self._pending or self._running or self._retired:
                return None
            slot = self._run_slots.take()
            if slot is None:
                return None
        try:
            started = time.perf_counter_ns()
            outcome = _run_alone(
                self._run, self.model.name, feeds, output_names, rows, self._estimate.measures()
            )
            seconds = (time.perf_counter_ns() - started) * 1e-9
        finally:
            self._run_slots.give(slot)
        self._inline_runs.inc()
        self._queue_time.observe(0.0)
        if isinstance(outcome, Exception):
            self._record_run(seconds, rows, 1, (), inline=True)
            raise outcome
        self._record_run(seconds, rows, 1, (outcome[1],), inline=True)
        return outcome[0], 0, outcome[1]

    def withdraw(self, future: asyncio.Future[Served]) -> bool:
        """Take the request of `future` (its caller went away) out of the queue; False when
        a run thread has taken it already (it runs, its answer is dropped)."""
        with self._lock:
            for request in self._pending:
                if request.future is future:
                    self._pending.remove(request)
                    self._pending_rows -= request.rows
                    return True
        return False

    def retire(self) -> None:
        """Take no more requests from the batcher's table; run the queued ones, then stop."""
        with self._lock:
            self._retired = True
            self._arrived.notify_all()

    def close(self) -> None:
        """Stop now: queued requests fail with 503 (the server is going away)."""
        with self._lock:
            self._retired = True
            abandoned = list(self._pending)
            self._pending.clear()
            self._pending_rows = 0
            self._arrived.notify_all()
        self._settle(abandoned, [Unavailable("the server is shutting down")] * len(abandoned))

    def _finished(self, batch: list[_Pending], result: _RunResult | BaseException) -> None:
        """On the event loop: record the run, answer every caller of the batch."""
        if isinstance(result, BaseException):
            self._settle(batch, [result] * len(batch))  # a bug, not the input: 500 for all
            return
        started = result.started
        for request in batch:
            self._queue_time.observe(started - request.enqueued)
        self._record_run(result.finished - started, result.rows, len(batch), result.executions)
        for request, outcome in zip(batch, result.outcomes, strict=True):
            future = request.future
            if future.done():  # the caller went away
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                queue_ns = int((started - request.enqueued) * 1e9)
                future.set_result((outcome[0], queue_ns, outcome[1]))

    def _record_run(
        self,
        seconds: float,
        rows: int,
        requests: int,
        executions: Sequence[Execution],
        inline: bool = False,
    ) -> None:
        """On the event loop: one run's metrics, statistics and run-time estimate."""
        self._compute_time.observe(seconds)
        self._run_rows.observe(rows)
        self._run_requests.observe(requests)
        for execution in executions:
            self._statistics.record_execution(execution)
            self._estimate.observe(execution, inline)

    @staticmethod
    def _settle(batch: Sequence[_Pending], errors: Sequence[BaseException]) -> None:
        for request, error in zip(batch, errors, strict=True):
            if not request.future.done():  # else the caller went away
                request.future.set_exception(error)

    # ------------------------------------------------------------ run thread side

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    if self._retired:
                        return
                    self._arrived.wait()
            slot = self._run_slots.wait()
            try:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    result: _RunResult | BaseException = run_batch(
                        self._run, self.model.name, batch, self._output_names(batch)
                    )
                except Exception as exc:
                    result = exc
                with self._lock:
                    self._running -= 1
            finally:
                self._run_slots.give(slot)
            try:
                self._loop.call_soon_threadsafe(self._finished, batch, result)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    def _next_batch(self) -> list[_Pending]:
        """Wait, up to the oldest request's deadline, for a full batch (`max_batch_size` rows or
        a preferred size: `BatchPolicy.batch_ready`); take a batch.

        The oldest is looked up again after each wake-up: when it was withdrawn, the next
        one's deadline counts (and with none left, there is nothing to wait for).
        """
        delay = self.policy.max_queue_delay_seconds
        with self._lock:
            if self.policy.batching and self.policy.max_queue_delay_us:
                self._gathering = True
                while self._pending and not self.policy.batch_ready(self._pending_rows):
                    remaining = self._pending[0].enqueued + delay - time.perf_counter()
                    if remaining <= 0 or self._retired:
                        break
                    self._arrived.wait(remaining)
                self._gathering = False
            return self._take_batch()

    def _take_batch(self) -> list[_Pending]:
        """The oldest live request and, when batching, every compatible one that fits.

        Called with the lock held.
        """
        batch: list[_Pending] = []
        rows = 0
        kept: deque[_Pending] = deque()
        limit = self.policy.batch_limit(self._pending_rows) if self.policy.batching else 0
        while self._pending:
            request = self._pending.popleft()
            if request.future.cancelled():
                self._pending_rows -= request.rows
            elif not batch:
                batch.append(request)
                rows = request.rows
                if rows >= limit:
                    break
            elif request.signature == batch[0].signature and rows + request.rows <= limit:
                batch.append(request)
                rows += request.rows
                if rows == limit:
                    break
            else:
                kept.append(request)
        kept.extend(self._pending)
        self._pending = kept
        self._pending_rows -= rows
        if batch:
            self._running += 1
        return batch

    def _output_names(self, batch: list[_Pending]) -> list[str]:
        first = batch[0].output_names
        if all(request.output_names == first for request in batch):
            return list(first)
        wanted = {name for request in batch for name in request.output_names}
        return [name for name in self._output_order if name in wanted]


class Batcher:
    """Every model version's queue, created on its first request; owned by the app.

    `concurrent_runs` runs at once in all, shared by the models; each queue has as many
    run threads (a thread waits while `concurrent_runs` others run).
    """

    def __init__(self, metrics: ServiceMetrics, concurrent_runs: int) -> None:
        self._metrics = metrics
        self._threads = concurrent_runs
        self._run_slots = RunSlots(concurrent_runs)
        self._queues: dict[tuple[str, int], ModelQueue] = {}

    def queue(self, model: LoadedModel) -> ModelQueue:
        key = (model.name, model.version)
        queue = self._queues.get(key)
        if queue is None or queue.model is not model:  # first request, or a reloaded model
            if queue is not None:
                queue.retire()
            queue = ModelQueue(model, self._metrics, self._run_slots, self._threads)
            self._queues[key] = queue
        return queue

    def check_room(self, model: LoadedModel) -> None:
        """Raise `QueueFull` when `model`'s queue is full (checked again at `run`)."""
        self.queue(model).check_room()

    async def run(
        self, model: LoadedModel, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> Served:
        """`model.eval_session` on `feeds`, possibly merged with other requests' rows, or
        right here when that is cheaper (`ModelQueue.run_inline`: nothing to cancel then).

        Cancelled while queued, the request leaves the queue and never runs; while running,
        its run finishes for the others and its answer is dropped. Either way it is
        counted in `bnfold_requests_cancelled_total` and the cancellation goes on.
        """
        queue = self.queue(model)
        served = queue.run_inline(feeds, output_names)
        if served is not None:
            return served
        future = queue.submit(feeds, output_names)
        try:
            return await future
        except asyncio.CancelledError:
            stage = "queued" if queue.withdraw(future) else "running"
            self._metrics.cancelled.labels(model.name, stage).inc()
            raise

    def retire(self, name: str) -> None:
        """After a load or unload of `name`: its queues drain and stop holding the old sessions."""
        for key in [key for key in self._queues if key[0] == name]:
            self._queues.pop(key).retire()

    def retire_version(self, name: str, version: int) -> None:
        """After an unload of one version: its queue drains and lets go of the sessions."""
        for key in [key for key in self._queues if key[:2] == (name, version)]:
            self._queues.pop(key).retire()

    def close(self) -> None:
        for queue in self._queues.values():
            queue.close()
        self._queues.clear()
