"""Noticing an HTTP client that goes away while its inference request waits.

uvicorn does not cancel a request whose client disconnected: once the body is
read, the ASGI `receive()` returns `http.disconnect` when it does, and only
then. So a waiting request must ask. A task blocked on `receive()` costs more
than a whole digits-MLP request (measured: 20-40 µs of event-loop time each
when every request over 2 ms got one), and most requests are answered in a few
milliseconds, so only requests still waiting after a while are watched:

    request waits ──► DisconnectWatch in the app's DisconnectWatcher's set
                        │ (a set insert and removal: all most requests pay)
    every `period` ─► sweep: a watch seen by the previous sweep too (waiting
                        │ `period` to 2 x `period`) gets a task on receive()
    http.disconnect ─► that task cancels the request's task: `DataPlane.predict`
                       withdraws it from the batcher's queue (never run) or
                       drops its answer (already running)

A request cancelled this way gets no response (its client is gone); the
caller tells such a cancellation from any other (the shutdown's) by
`DisconnectWatch.disconnected`. Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from starlette.requests import Request

WATCH_PERIOD_SECONDS = 0.025


class DisconnectWatch:
    """One waiting request's watch; within its block, a disconnect cancels the block's task."""

    __slots__ = ("_owner", "_receive", "_task", "_watcher", "disconnected", "sweeps")

    def __init__(self, owner: DisconnectWatcher, request: Request) -> None:
        self._owner = owner
        self._receive = request.receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.sweeps = 0  # sweeps that found it waiting
        self.disconnected = False

    def __enter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._owner.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner.waiting.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()

    def start(self) -> None:
        """Watch the connection from now on (the sweep's decision)."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect" and self._task is not None:
            self.disconnected = True
            self._task.cancel()


class DisconnectWatcher:
    """The app's waiting requests and the sweep that starts watching the slow ones."""

    def __init__(self, period: float = WATCH_PERIOD_SECONDS) -> None:
        self.period = period
        self.waiting: set[DisconnectWatch] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None

    def watch(self, request: Request) -> DisconnectWatch:
        """`with watcher.watch(request) as watch:` around the wait (after the body is read:
        the watch takes what `receive()` returns)."""
        return DisconnectWatch(self, request)

    def add(self, watch: DisconnectWatch) -> None:
        self.waiting.add(watch)
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(self.period, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        for watch in self.waiting:
            watch.sweeps += 1
            if watch.sweeps == 2:  # waiting since before the previous sweep
                watch.start()
        if self.waiting:
            self._sweep_timer = asyncio.get_running_loop().call_later(self.period, self._sweep)


def forget_cancellation() -> None:
    """After handling a `DisconnectWatch`'s cancellation: the task may go on (Python 3.11+
    counts cancellation requests, and asyncio.timeout would still see this one)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
