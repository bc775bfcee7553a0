"""The drain window: on SIGTERM, keep answering while reporting not-ready, then shut down.

A load balancer or a Kubernetes Service learns that a server is going away a
moment after the server does (its readiness probe, its endpoints update). A
server that stops listening at SIGTERM resets the connections that arrive in
that moment, and those still queued in the kernel. So on SIGTERM the server
first drains for `drain_seconds`: /v2/health/ready and gRPC ServerReady say no,
everything else is answered as before, and every HTTP response carries
`Connection: close` (http_protocol.py reads `DrainState.draining`), so that
keep-alive clients reconnect, to another server once the balancer has moved.
Then it stops the way it stopped before: uvicorn closes the listening socket
and gives the requests in flight `shutdown_grace_seconds`; gRPC begins its stop
with the same grace at the same moment.

SIGINT (Ctrl-C: a person, not an orchestrator) never drains, and a second
SIGTERM or a SIGINT during the window ends it at once. With `drain_seconds` 0
SIGTERM stops listening at once, as it did before the window existed.

One handler, chained in front of uvicorn's (`drain_on_exit_signals`), serves
REST and gRPC: uvicorn installs its handlers with signal.signal in
`capture_signals` and runs the app's lifespan inside it, so a handler the
lifespan installs sees the signal first and passes it on to uvicorn's when the
window ends. A server run in another thread (the tests' in-process servers) has
no signal handling: `DrainWindow.signal` is what the handler calls, and what a
test calls instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

logger = logging.getLogger("bnfold.service")

DRAIN_STATE_KEY = "drain"
"""Key of the `DrainState` in the lifespan state (uvicorn's `app_state` in each protocol,
`request.state.drain` in each request): one per server, shared by its connections."""

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class DrainState:
    """Whether this server is in its drain window (or past it).

    Read on the hot path by the HTTP protocol (Connection: close on responses
    begun while draining) and by readiness; written only on the event loop.
    """

    draining: bool = False


StopServing = Callable[[int], object]
"""What the end of the window starts, given the signal that ended it: gRPC's stop, and
uvicorn's own exit handler (stop listening, wait for the requests in flight)."""


class DrainWindow:
    """The window of one server process, from the first exit signal to the stop.

    Every method runs on the event loop, except `signal`, which may be called
    from any thread (a signal handler, a test).
    """

    def __init__(
        self,
        state: DrainState,
        drain_seconds: float,
        grace_seconds: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.state = state
        self.drain_seconds = drain_seconds
        self.grace_seconds = grace_seconds
        self._loop = loop
        self._stop_serving: list[StopServing] = []
        self._timer: asyncio.TimerHandle | None = None
        self.ended = False

    def when_ended(self, stop: StopServing) -> None:
        """Call `stop(signum)` when the window ends, and again for each exit signal after."""
        self._stop_serving.append(stop)

    def signal(self, signum: int) -> None:
        """React to exit signal `signum` as the server would: the one entry point, thread-safe."""
        self._loop.call_soon_threadsafe(self._on_exit_signal, signum)

    def _on_exit_signal(self, signum: int) -> None:
        if signum == signal.SIGTERM and self.drain_seconds > 0 and not self.state.draining:
            self._begin()
        else:
            self._end(signum)

    def _begin(self) -> None:
        self.state.draining = True
        logger.info(
            "SIGTERM: draining for %g s: not ready, still answering; then stop listening and "
            "give requests in flight up to %g s",
            self.drain_seconds,
            self.grace_seconds,
        )
        self._timer = self._loop.call_later(self.drain_seconds, self._window_over)

    def _window_over(self) -> None:
        self._timer = None
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        """Stop serving now; after the window, pass `signum` on again (uvicorn: a second
        SIGINT forces the exit)."""
        if self._timer is not None:  # cut short
            self._timer.cancel()
            self._timer = None
            logger.info("%s: the drain window ends now", signal.Signals(signum).name)
        self.state.draining = True
        self.ended = True
        for stop in self._stop_serving:
            stop(signum)


def drain_on_exit_signals(window: DrainWindow) -> Callable[[], None]:
    """Route SIGINT and SIGTERM through `window`, whose end passes them on to the handlers
    installed before (uvicorn's); returns what puts those back. Outside the main thread
    (no signals there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        window.signal(signum)

    def pass_on(signum: int) -> None:
        passed_on = previous.get(signum)
        if callable(passed_on):
            passed_on(signum, None)

    for exit_signal in EXIT_SIGNALS:
        previous[exit_signal] = signal.signal(exit_signal, handler)
    window.when_ended(pass_on)

    def restore() -> None:
        for exit_signal, passed_on in previous.items():
            if signal.getsignal(exit_signal) is handler:
                signal.signal(exit_signal, passed_on)

    return restore
