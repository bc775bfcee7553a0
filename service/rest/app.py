"""The app: `create_app(settings)` builds it and includes the routers; its lifespan loads models
and runs the gRPC server (service/grpc/) beside REST, on the same event loop and data plane.

`bnfold serve` resolves the execution providers before it starts uvicorn (a
`--device cuda` without a GPU fails there, with one line) and hands them to
`create_app`; an app built without them (the test server, each `--workers`
process) resolves them in its lifespan. Either way they are resolved once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from bnfold.service.access_log import AccessLog
from bnfold.service.batch_policy import BatchPolicy
from bnfold.service.batching import Batcher
from bnfold.service.codec import decode_request, encode_response
from bnfold.service.console.hosting import ConsoleFiles, console_routes, docs_routes
from bnfold.service.dataplane import DataPlane, server_version
from bnfold.service.drain import DRAIN_STATE_KEY, DrainState, DrainWindow, drain_on_exit_signals
from bnfold.service.drift_monitor import DriftConfig, DriftMonitor
from bnfold.service.grpc.server import GrpcServer, start_grpc_server
from bnfold.service.grpc.servicer import InferenceServicer
from bnfold.service.heap import fix_malloc_thresholds, freeze_startup_objects
from bnfold.service.metrics import ServiceMetrics
from bnfold.service.providers import resolve_providers
from bnfold.service.recalibration import Recalibrations
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.request_log import configure_logging, direct_access_lines
from bnfold.service.rest import errors, openapi
from bnfold.service.rest.access import RequestLogMiddleware
from bnfold.service.rest.bodies import DecodeBudget
from bnfold.service.rest.lane import InferenceLane, inference_target
from bnfold.service.rest.recalibrate import recalibration_routes
from bnfold.service.rest.routes import (
    health_routes,
    inference_routes,
    model_routes,
    repository_routes,
)
from bnfold.service.runs import ExecutorRunner, run_executor
from bnfold.service.sessions import SessionConfig
from bnfold.service.settings import Settings
from bnfold.service.tracing import Tracing

logger = logging.getLogger("bnfold.service")


class BnfoldApp(FastAPI):
    """FastAPI, with POST .../infer taken in front of FastAPI's own layers.

    `inference_lane` (lane.py) answers an infer request; every other request, an
    infer request under a root path, and the lifespan go through FastAPI as usual.
    Measured on the digits MLP at 8 clients (BENCHMARKS.md, the tiny-model gap): the
    layers skipped cost the event loop more than the model's run.
    """

    inference_lane: InferenceLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.inference_lane
        if (
            lane is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and not self.root_path
            and not scope.get("root_path")
        ):
            target = inference_target(scope["path"])
            if target is not None:
                scope["app"] = self
                await lane(scope, receive, send, target)
                return
        await super().__call__(scope, receive, send)


def _lifespan(
    settings: Settings, providers: tuple[str, ...] | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, DrainState]]]:
    """Start-up: load the repository (in a thread), build the data plane, start the drift
    monitor's worker and the gRPC server (`app.state.grpc_port`: its port, None when off),
    route the exit signals through the drain window (`app.state.drain_window`; its state is
    the lifespan state's `DRAIN_STATE_KEY`, which the HTTP protocol reads); shut-down: drain
    gRPC calls (uvicorn has drained REST), stop the worker, drain runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, DrainState]]:
        started = time.perf_counter()
        chosen = (
            providers
            if providers is not None
            else await asyncio.to_thread(resolve_providers, settings.device)
        )
        registry = ModelRegistry(
            settings.repository,
            SessionConfig.from_settings(settings, chosen),
            BatchPolicy.from_settings(settings),
            settings.version_policy.value,
        )
        runs = settings.resolved_concurrent_runs
        executor = run_executor(runs)
        metrics: ServiceMetrics = app.state.metrics
        batcher = Batcher(metrics, runs)
        drift = DriftMonitor(DriftConfig.from_settings(settings))
        dataplane = DataPlane(registry, ExecutorRunner(executor, metrics), batcher, metrics, drift)
        dataplane.tracing = app.state.tracing
        app.state.dataplane = dataplane
        app.state.recalibrations = Recalibrations(
            registry,
            threads=settings.recalibration_threads,
            reservoir=dataplane.recent_inputs
            if settings.drift_monitoring and settings.drift_reservoir_samples > 0
            else None,
            on_loaded=dataplane.version_loaded,
        )
        index = await asyncio.to_thread(registry.load_all)
        dataplane.prepare()
        warm_codec()
        ready = sum(entry.state is ModelState.READY for entry in index)
        logger.info(
            "serving %s: %d of %d package versions ready, providers %s, %d concurrent run(s) x "
            "%d thread(s), started in %.2f s",
            settings.repository,
            ready,
            len(index),
            ", ".join(chosen),
            runs,
            settings.session_threads,
            time.perf_counter() - started,
        )
        if settings.console:
            logger.info("web console at /ui/, API docs at /docs")
        grpc_server: GrpcServer | None = None
        if settings.grpc:  # first: a port in use fails the start before the drift worker runs
            servicer = InferenceServicer(
                dataplane, app.state.decode_budget, settings.admin_token, app.state.access_log
            )
            grpc_server = await start_grpc_server(settings, servicer)
        app.state.grpc_port = grpc_server.port if grpc_server is not None else None
        window = DrainWindow(
            dataplane.drain,
            settings.drain_seconds,
            settings.shutdown_grace_seconds,
            asyncio.get_running_loop(),
        )
        if grpc_server is not None:  # gRPC's stop begins beside uvicorn's, not after it
            running = grpc_server
            window.when_ended(lambda _signum: running.begin_stop(settings.shutdown_grace_seconds))
        restore_signals = drain_on_exit_signals(window)
        app.state.drain_window = window
        drift.start()
        metrics.add_source(dataplane.drift_metric_families)
        # start-up's objects leave the collector's walks: a full collection over them
        # stalled the request in flight for 66-260 ms (heap.py)
        if app.state.owns_process:
            frozen = freeze_startup_objects()
            logger.debug("froze %d start-up objects out of garbage collection", frozen)
        dataplane.ready = True
        try:
            yield {DRAIN_STATE_KEY: dataplane.drain}
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_seconds)
            restore_signals()
            dataplane.ready = False
            metrics.remove_source(dataplane.drift_metric_families)
            batcher.close()
            await asyncio.to_thread(drift.close)
            await asyncio.to_thread(executor.shutdown, wait=True)
            if dataplane.tracing is not None:
                await asyncio.to_thread(dataplane.tracing.shutdown)

    return lifespan


def warm_codec() -> None:
    """Decode one tiny V2 request and encode its answer, JSON and binary, once per process:
    the first real request then finds orjson's and numpy's paths warm (about 0.2 ms)."""
    body = b'{"id":"w","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[0,1]}]}'
    decoded = decode_request(body, None)
    array = next(iter(decoded.inputs.values()))
    encode_response({"model_name": "w"}, [("y", array, False), ("z", array, True)])


def create_app(
    settings: Settings,
    providers: tuple[str, ...] | None = None,
    tracing: Tracing | None = None,
    owns_process: bool = False,
) -> FastAPI:
    """The service for `settings`; models load when the app starts (its lifespan).

    `providers`: the execution providers `resolve_providers(settings.device)`
    chose; None resolves them at start-up. `tracing`: where spans go; None exports
    them over OTLP when `settings.otlp_endpoint` is set, else tracing is off.
    `owns_process`: the app is the process's one job (`bnfold serve` and its
    workers), so process-wide tuning applies: start-up's objects are frozen out of
    garbage collection (heap.freeze_startup_objects). Not in a test's process,
    where a frozen app that stopped would never be collected.
    """
    app = BnfoldApp(
        title=openapi.TITLE,
        version=server_version(),
        description=openapi.DESCRIPTION,
        lifespan=_lifespan(settings, providers),
        # Our own /docs (console/hosting.py): Swagger UI vendored, no CDN; no ReDoc.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.owns_process = owns_process
    if tracing is None and settings.otlp_endpoint:
        tracing = Tracing.otlp(settings.otlp_endpoint, server_version())
    app.state.tracing = tracing
    app.state.metrics = ServiceMetrics()
    fix_malloc_thresholds()
    app.state.decode_budget = DecodeBudget(settings.decode_budget)
    errors.install(app)
    # outermost of our middleware: request ids and access lines for every request
    app.state.access_log = (
        AccessLog(direct_lines=direct_access_lines) if settings.access_log else None
    )
    app.add_middleware(RequestLogMiddleware, access_log=app.state.access_log)
    app.inference_lane = InferenceLane(app.state.access_log)
    for router in (
        inference_routes(),
        health_routes(),
        model_routes(),
        repository_routes(),
        recalibration_routes(),
    ):
        app.include_router(router)
    console_files = ConsoleFiles.load(openapi.TITLE)
    app.include_router(docs_routes(console_files))
    app.include_router(console_routes(console_files, enabled=settings.console))
    openapi.install_openapi(app)
    return app


def create_app_from_env() -> FastAPI:
    """The app for `BNFOLD_*` environment variables alone: uvicorn's factory for `--workers` > 1,
    where every worker process builds its own app (and loads every model itself)."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings, owns_process=True)
