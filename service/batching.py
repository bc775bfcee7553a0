"""Dynamic batching (Triton's idea): requests for one model version share session runs.

    submit ──► queue of (model, version) ──► consumer: a free run slot, the oldest
      │        (> max_queue_size: 503 +       request, then up to max_queue_delay_us
      │         Retry-After, at once)         for more rows, up to max_batch_size
      │                                              │
      │                   [a a][b][c c c] ── concatenate on axis 0, one run
      │                                              │  (executor thread)
      ◄── each caller: exactly its rows, its outputs ┘

One `ModelQueue` per loaded model version, with one consumer task; it forms a
batch when one of its run slots (one per executor thread) is free, so under
load requests pile up while runs are busy and the next batch is larger, as
in Triton. Only requests whose inputs agree on every dimension but the first
are merged (the datatypes are fixed by the manifest); the run asks for the
union of the outputs the merged requests selected. A request with more rows
than `max_batch_size` runs alone. With batching off (`BatchPolicy`), each
request is a run of its own, still through the bounded queue.

Failure isolation: when a merged run fails, every request in it is run again
alone, so only the request that cannot run gets its error (422).

Waiting: asyncio's timers have millisecond granularity (uvloop rounds delays
under 0.5 ms to zero), so the part of a wait under a millisecond yields to the
event loop pass by pass instead of sleeping: requests whose bytes are already
in the socket buffers get read and join the batch. That costs CPU only while
the loop has nothing else to do, and at most `max_queue_delay_us` per batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from bnfold.service.errors import QueueFull, Unavailable
from bnfold.service.metrics import ServiceMetrics
from bnfold.service.runs import RUN_ERRORS, run_failed
from bnfold.service.sessions import LoadedModel

logger = logging.getLogger("bnfold.service")

# Below this much remaining wait, yield loop passes instead of arming a timer.
_TIMER_GRANULARITY_SECONDS = 0.001

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
    """Executor side: run `batch` (merged when it has several requests), one outcome each."""
    started = time.perf_counter()
    outcomes = _run_merged(session, model_name, batch, names) if len(batch) > 1 else None
    if outcomes is None:
        outcomes = [_run_alone(session, model_name, request) for request in batch]
    rows = sum(request.rows for request in batch)
    return _RunResult(started, time.perf_counter(), rows, outcomes)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ModelQueue:
    """The queue and consumer of one loaded model version. Lives on the event loop."""

    def __init__(
        self, model: LoadedModel, executor: Executor, metrics: ServiceMetrics, slots: int
    ) -> None:
        self.model = model
        self.policy = model.batching
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._pending: deque[_Pending] = deque()
        self._pending_rows = 0
        self._free_slots = slots
        self._waiter: asyncio.Future[None] | None = None
        self._retired = False
        self._output_order = [tensor.name for tensor in model.outputs]
        self._queue_time = metrics.queue.labels(model.name)
        self._compute_time = metrics.compute.labels(model.name, "eval")
        self._run_rows = metrics.run_batch_size.labels(model.name)
        self._run_requests = metrics.run_requests.labels(model.name)
        self._consumer = self._loop.create_task(
            self._consume(), name=f"bnfold-batcher-{model.name}-{model.version}"
        )

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
        self._pending.append(
            _Pending(feeds, tuple(output_names), rows, signature, time.perf_counter(), future)
        )
        self._pending_rows += rows
        self._notify()
        return future

    def retire(self) -> None:
        """Take no more requests from the batcher's table; finish the queued ones, then stop."""
        self._retired = True
        self._notify()

    def close(self) -> None:
        """Stop now: queued requests fail with 503 (the server is going away)."""
        self._consumer.cancel()
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(Unavailable("the server is shutting down"))
        self._pending_rows = 0

    # ------------------------------------------------------------ consumer side

    def _notify(self) -> None:
        if self._waiter is not None:
            _wake(self._waiter)

    async def _wait(self, timeout: float | None) -> None:
        """Until `_notify` or `timeout` seconds (None: no timeout)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else self._loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _gather(self) -> None:
        """Wait, up to the oldest request's deadline, for `max_batch_size` rows."""
        deadline = self._pending[0].enqueued + self.policy.max_queue_delay_seconds
        while self._pending and self._pending_rows < self.policy.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            if remaining >= _TIMER_GRANULARITY_SECONDS:
                await self._wait(remaining - _TIMER_GRANULARITY_SECONDS / 2)
            else:
                await asyncio.sleep(0)

    async def _consume(self) -> None:
        while True:
            while self._free_slots == 0 or not self._pending:
                if self._retired and not self._pending:
                    return
                await self._wait(None)
            if self.policy.batching and self.policy.max_queue_delay_us:
                await self._gather()
            batch = self._take_batch()
            if batch:
                self._dispatch(batch)

    def _take_batch(self) -> list[_Pending]:
        """The oldest live request and, when batching, every compatible one that fits."""
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

    def _dispatch(self, batch: list[_Pending]) -> None:
        self._free_slots -= 1
        job = functools.partial(
            run_batch, self.model.eval_session, self.model.name, batch, self._output_names(batch)
        )
        try:
            future = self._loop.run_in_executor(self._executor, job)
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            self._free_slots += 1
            self._settle(batch, [Unavailable(f"the server is shutting down ({exc})")] * len(batch))
            return
        future.add_done_callback(functools.partial(self._finished, batch))

    def _finished(self, batch: list[_Pending], future: asyncio.Future[_RunResult]) -> None:
        self._free_slots += 1
        self._notify()
        if future.cancelled():
            self._settle(batch, [Unavailable("the run was cancelled")] * len(batch))
            return
        error = future.exception()
        if error is not None:
            self._settle(batch, [error] * len(batch))
            return
        result = future.result()
        for request in batch:
            self._queue_time.observe(result.started - request.enqueued)
        self._compute_time.observe(result.finished - result.started)
        self._run_rows.observe(result.rows)
        self._run_requests.observe(len(batch))
        self._settle(batch, result.outcomes)

    @staticmethod
    def _settle(batch: list[_Pending], outcomes: Sequence[Outcome]) -> None:
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():  # the caller went away
                continue
            if isinstance(outcome, Exception):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)


class Batcher:
    """Every model version's queue, created on its first request; owned by the app."""

    def __init__(self, executor: Executor, metrics: ServiceMetrics, slots: int) -> None:
        self._executor = executor
        self._metrics = metrics
        self._slots = slots
        self._queues: dict[tuple[str, int], ModelQueue] = {}

    def queue(self, model: LoadedModel) -> ModelQueue:
        key = (model.name, model.version)
        queue = self._queues.get(key)
        if queue is None or queue.model is not model:  # first request, or a reloaded model
            if queue is not None:
                queue.retire()
            queue = ModelQueue(model, self._executor, self._metrics, self._slots)
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

    def close(self) -> None:
        for queue in self._queues.values():
            queue.close()
        self._queues.clear()
