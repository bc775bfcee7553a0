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
`max_batch_size` runs alone. With batching off (`BatchPolicy`), each request
is a run of its own, still through the bounded queue.

Failure isolation: when a merged run fails, every request in it is run again
alone, so only the request that cannot run gets its error (422).

Threads: the queue is shared under a lock; the event loop appends, run threads
take. Futures and metrics are only touched on the event loop (a finished run
hands its outcomes back with `call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from bnfold.service.errors import QueueFull, Unavailable
from bnfold.service.metrics import ServiceMetrics
from bnfold.service.runs import RUN_ERRORS, run_failed
from bnfold.service.sessions import LoadedModel

logger = logging.getLogger("bnfold.service")

Outcome = list[np.ndarray] | Exception


@dataclass(eq=False)
class _Pending:
    """One queued request: validated feeds (manifest input order) and the caller's future."""

    feeds: dict[str, np.ndarray]
    output_names: tuple[str, ...]
    rows: int
    signature: tuple[tuple[int, ...], ...]
    enqueued: float
    future: asyncio.Future[list[np.ndarray]]


@dataclass(frozen=True)
class _RunResult:
    started: float
    finished: float
    rows: int
    outcomes: list[Outcome]


def _run_alone(session: ort.InferenceSession, model_name: str, request: _Pending) -> Outcome:
    try:
        return session.run(list(request.output_names), request.feeds)
    except RUN_ERRORS as exc:
        return run_failed(model_name, exc)


def _run_merged(
    session: ort.InferenceSession, model_name: str, batch: list[_Pending], names: list[str]
) -> list[Outcome] | None:
    """One run on the concatenated batch, split back per request; None if it cannot be used."""
    feeds = {
        name: np.concatenate([request.feeds[name] for request in batch]) for name in batch[0].feeds
    }
    rows = sum(request.rows for request in batch)
    try:
        outputs = session.run(names, feeds)
    except RUN_ERRORS:
        return None
    if any(output.ndim == 0 or output.shape[0] != rows for output in outputs):
        logger.warning("%s: outputs of a merged run are not batch-major; running alone", model_name)
        return None
    position = {name: index for index, name in enumerate(names)}
    outcomes: list[Outcome] = []
    offset = 0
    for request in batch:
        end = offset + request.rows
        outcomes.append([outputs[position[name]][offset:end] for name in request.output_names])
        offset = end
    return outcomes


def run_batch(
    session: ort.InferenceSession, model_name: str, batch: list[_Pending], names: list[str]
) -> _RunResult:
    """On a run thread: run `batch` (merged when it has several requests), one outcome each."""
    started = time.perf_counter()
    outcomes = _run_merged(session, model_name, batch, names) if len(batch) > 1 else None
    if outcomes is None:
        outcomes = [_run_alone(session, model_name, request) for request in batch]
    rows = sum(request.rows for request in batch)
    return _RunResult(started, time.perf_counter(), rows, outcomes)


class ModelQueue:
    """The queue of one loaded model version and the threads that run it."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: ServiceMetrics,
        concurrent_runs: threading.Semaphore,
        threads: int,
    ) -> None:
        self.model = model
        self.policy = model.batching
        self._loop = asyncio.get_running_loop()
        self._concurrent_runs = concurrent_runs
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._gathering = False
        self._retired = False
        self._output_order = [tensor.name for tensor in model.outputs]
        self._queue_time = metrics.queue.labels(model.name)
        self._compute_time = metrics.compute.labels(model.name, "eval")
        self._run_rows = metrics.run_batch_size.labels(model.name)
        self._run_requests = metrics.run_requests.labels(model.name)
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
    ) -> asyncio.Future[list[np.ndarray]]:
        """Queue one validated request; raises `QueueFull` when `max_queue_size` are waiting."""
        self.check_room()
        future: asyncio.Future[list[np.ndarray]] = self._loop.create_future()
        first = next(iter(feeds.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        signature = tuple(array.shape[1:] for array in feeds.values())
        request = _Pending(feeds, tuple(output_names), rows, signature, time.perf_counter(), future)
        with self._lock:
            self._pending.append(request)
            self._pending_rows += rows
            # A futex wake-up only when a run thread is waiting, and not for a thread that
            # waits for company until the batch is full or its deadline passes.
            if not self._gathering or self._pending_rows >= self.policy.max_batch_size:
                self._arrived.notify()
        return future

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
        for request in batch:
            self._queue_time.observe(result.started - request.enqueued)
        self._compute_time.observe(result.finished - result.started)
        self._run_rows.observe(result.rows)
        self._run_requests.observe(len(batch))
        self._settle(batch, result.outcomes)

    @staticmethod
    def _settle(batch: Sequence[_Pending], outcomes: Sequence[BaseException | Outcome]) -> None:
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():  # the caller went away
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    # ------------------------------------------------------------ run thread side

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    if self._retired:
                        return
                    self._arrived.wait()
            with self._concurrent_runs:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    result: _RunResult | BaseException = run_batch(
                        self.model.eval_session,
                        self.model.name,
                        batch,
                        self._output_names(batch),
                    )
                except Exception as exc:
                    result = exc
            try:
                self._loop.call_soon_threadsafe(self._finished, batch, result)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    def _next_batch(self) -> list[_Pending]:
        """Wait, up to the oldest request's deadline, for `max_batch_size` rows; take a batch."""
        with self._lock:
            if self.policy.batching and self.policy.max_queue_delay_us and self._pending:
                deadline = self._pending[0].enqueued + self.policy.max_queue_delay_seconds
                self._gathering = True
                while self._pending_rows < self.policy.max_batch_size:
                    remaining = deadline - time.perf_counter()
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
        limit = self.policy.max_batch_size if self.policy.batching else 0
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
        self._concurrent_runs = threading.BoundedSemaphore(concurrent_runs)
        self._queues: dict[tuple[str, int], ModelQueue] = {}

    def queue(self, model: LoadedModel) -> ModelQueue:
        key = (model.name, model.version)
        queue = self._queues.get(key)
        if queue is None or queue.model is not model:  # first request, or a reloaded model
            if queue is not None:
                queue.retire()
            queue = ModelQueue(model, self._metrics, self._concurrent_runs, self._threads)
            self._queues[key] = queue
        return queue

    def check_room(self, model: LoadedModel) -> None:
        """Raise `QueueFull` when `model`'s queue is full (checked again at `run`)."""
        self.queue(model).check_room()

    async def run(
        self, model: LoadedModel, feeds: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        """`model.eval_session` on `feeds`, possibly merged with other requests' rows."""
        return await self.queue(model).submit(feeds, output_names)

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
