"""The drain window: on SIGTERM, keep answering while reporting not-ready, then shut down.

(Skeleton: the drain helper owns this module and fills it in. The contract other
modules rely on is `DrainState` and `DRAIN_STATE_KEY` below.)
"""

from __future__ import annotations

from dataclasses import dataclass

DRAIN_STATE_KEY = "drain"
"""Key of the `DrainState` in the lifespan state (uvicorn's `app_state` in each protocol,
`request.state.drain` in each request): one per server, shared by its connections."""


@dataclass
class DrainState:
    """Whether this server is in its drain window (or past it).

    Read on the hot path by the HTTP protocol (Connection: close on responses
    begun while draining) and by readiness; written only on the event loop.
    """

    draining: bool = False
