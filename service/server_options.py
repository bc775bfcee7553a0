"""The uvicorn options a `Settings` stands for, shared by `bnfold serve` and the test server.

One function, so the tests run the server production runs: the same event
loop, HTTP protocol and its client limits (http_protocol.py: head size,
header and body timeouts, connections), keep-alive, logging and shutdown
grace. Only the caller's address, port and log level may differ.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from bnfold.service.settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run` and `uvicorn.Config` for `settings`.

    With httptools (uvicorn[standard] on Linux and macOS) the protocol is
    `GuardedProtocol`; without it uvicorn's h11 protocol, whose own cap on
    an incomplete request head (`h11_max_incomplete_event_size`, a 400 past it)
    gets the same byte limit; h11 has no limit on the number of header fields,
    no header or body timeout, no connection limit (http_protocol.py).
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "auto",
        "http": _http_protocol(settings),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "log_config": None,
        "log_level": settings.log_level.value,
        "access_log": False,  # ours replaces it: access_log.py, rest/access.py
        "timeout_keep_alive": settings.keep_alive_seconds,
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
        "server_header": False,
    }


def _http_protocol(settings: Settings) -> Any:
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    # imported here: http_protocol imports httptools
    from bnfold.service.http_protocol import ClientLimits, GuardedProtocol, HeadLimits, RefusalLog

    limits = ClientLimits(
        head=HeadLimits(settings.max_header_bytes, settings.max_header_count),
        header_timeout_seconds=settings.header_timeout_seconds,
        body_timeout_seconds=settings.body_timeout_seconds,
        max_connections=settings.max_connections,
    )
    return functools.partial(GuardedProtocol, limits=limits, refusal_log=RefusalLog())
