"""The gRPC server: grpc.aio on the app's event loop, started and stopped by the app's lifespan.

One process, one event loop: the REST app and this server share the data
plane (registry, batcher, metrics, drift monitor), the decode budget and the
admin token, so a model loaded over one transport is served over both and the
batcher merges rows from both. Messages are capped at `max_body_bytes` each
way, the REST body limit: grpc refuses a larger request with RESOURCE_EXHAUSTED
before any of our code runs (after decompression: a gzip message is bounded by
what it inflates to).

With `--workers N` every worker process serves gRPC on the same port
(SO_REUSEPORT, the kernel spreads the connections, as it does for uvicorn's
shared socket); a single process does not take a port another process holds.

Shutdown: `stop(grace)` refuses new calls at once and gives the calls in
flight `shutdown_grace_seconds` to finish, then cancels them. uvicorn runs the
app's shutdown only after it has drained REST, so waiting for it would put
the two grace periods end to end. The drain window (drain.py) therefore begins
gRPC's stop (`begin_stop`) at the moment it hands the exit signal to uvicorn,
and the lifespan's `stop` then waits for that drain. During the window gRPC
serves as before; only ServerReady says false. A server run in another thread
(the tests') has no signals: its lifespan stops gRPC itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc.aio

from bnfold.service.grpc import handlers
from bnfold.service.grpc.servicer import InferenceServicer
from bnfold.service.settings import Settings

logger = logging.getLogger("bnfold.service")


class GrpcPortUnavailable(OSError):
    """The gRPC address cannot be bound (in use, or not an address of this host)."""


def grpc_address(host: str, port: int) -> str:
    """host:port as grpc takes it; an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", int(settings.workers > 1)),
    ]


@dataclass
class GrpcServer:
    """A started grpc.aio server and the port it listens on (the chosen one for port 0)."""

    server: grpc.aio.Server
    host: str
    port: int
    _stopping: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return grpc_address(self.host, self.port)

    def begin_stop(self, grace_seconds: float) -> asyncio.Task[None]:
        """Start the drain (once) on the running loop; `stop` waits for it."""
        if self._stopping is None:
            logger.info("gRPC: draining calls in flight (up to %.1f s)", grace_seconds)
            self._stopping = asyncio.ensure_future(self.server.stop(grace_seconds))
        return self._stopping

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new calls, let those in flight finish within `grace_seconds`, cancel the rest
        (or wait for the drain an exit signal began)."""
        await self.begin_stop(grace_seconds)


async def start_grpc_server(settings: Settings, servicer: InferenceServicer) -> GrpcServer:
    """Listen on `settings.host`:`settings.grpc_port` on the running event loop."""
    server = grpc.aio.server(options=server_options(settings))
    handlers.register(servicer, server)
    address = grpc_address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio's way of saying the bind failed
        raise GrpcPortUnavailable(
            f"gRPC cannot listen on {address} ({exc}): is the port in use? Choose another "
            "with --grpc-port, or turn gRPC off with --no-grpc"
        ) from None
    await server.start()
    running = GrpcServer(server, settings.host, port)
    logger.info("gRPC on %s", running.address)
    return running
