"""The routes, in four groups; each reads its request and hands it to the `DataPlane`.

No route validates, looks up or runs anything itself, and no route lets
FastAPI validate a tensor body: the pydantic models in `protocol` only document
the wire format (`openapi`). Inference and compare sit on `DirectRoute`: no
dependency solving on the fast path; inference is answered before FastAPI's
routing even looks at it (`lane.InferenceLane`, the same `infer_request` behind it).
Their request is admitted (server and
model ready, room in the queue) before its body is read, and the body's decode
budget is held until the data plane's answer is built. Compare also takes its
inputs as a .npy or .npz body (`arrays`), its options then in the query string.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from bnfold.service.compare import CompareOptions
from bnfold.service.dataplane import request_output_names
from bnfold.service.metrics import CLIENT_CLOSED_REQUEST, CONTENT_TYPE
from bnfold.service.protocol import (
    DriftResponse,
    LiveResponse,
    ReadyResponse,
    RepositoryModel,
    ServerMetadataResponse,
)
from bnfold.service.request_log import adopt_body_id, note_model
from bnfold.service.rest import openapi
from bnfold.service.rest.arrays import array_body_kind, array_request, held_arrays, inputs_by_name
from bnfold.service.rest.disconnects import forget_cancellation
from bnfold.service.rest.requests import (
    DataPlaneDep,
    check_load_body,
    dataplane_of,
    decoded_body,
    disconnect_watcher,
    index_ready_only,
    json_body,
    load_config,
    require_admin,
)
from bnfold.service.rest.responses import (
    DirectRoute,
    encode_prediction,
    inference_response,
    json_response,
)
from bnfold.service.tracing import request_span

MODEL_PATH = "/v2/models/{model_name}"
ChannelsQuery = Annotated[
    bool, Query(description="Also return each layer's per-channel values (the drill-down).")
]
VERSION_PATH = "/v2/models/{model_name}/versions/{model_version}"


def health_routes() -> APIRouter:
    router = APIRouter(tags=["health and metadata"])

    @router.get("/v2", response_model=ServerMetadataResponse, summary="Server metadata")
    async def server_metadata(dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.server_metadata())

    @router.get("/v2/health/live", response_model=LiveResponse, summary="Liveness")
    async def live() -> Response:
        return json_response({"live": True})

    @router.get(
        "/v2/health/ready",
        response_model=ReadyResponse,
        summary="Readiness: 200 once the repository is loaded, 503 before, in the drain window "
        "after SIGTERM and while shutting down",
        responses=openapi.errors(503),
    )
    async def ready(dataplane: DataPlaneDep) -> Response:
        dataplane.check_server_ready()
        return json_response({"ready": True})

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}}},
    )
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    return router


def model_routes() -> APIRouter:
    router = APIRouter(tags=["models"])

    # before MODEL_PATH: "stats" is not a model name here, as in Triton
    @router.get("/v2/models/stats", summary="Statistics of every model", **openapi.MODEL_STATISTICS)
    async def statistics(dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_statistics(None, None))

    @router.get(f"{MODEL_PATH}/stats", summary="Model statistics", **openapi.MODEL_STATISTICS)
    async def model_statistics(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_statistics(model_name, None))

    @router.get(
        f"{VERSION_PATH}/stats", summary="Model version statistics", **openapi.MODEL_STATISTICS
    )
    async def version_statistics(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_statistics(model_name, model_version))

    @router.get(MODEL_PATH, summary="Model metadata", **openapi.MODEL_METADATA)
    async def metadata(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_metadata(model_name, None))

    @router.get(VERSION_PATH, summary="Model version metadata", **openapi.MODEL_METADATA)
    async def version_metadata(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_metadata(model_name, model_version))

    @router.get(f"{MODEL_PATH}/ready", summary="Model readiness", **openapi.MODEL_READY)
    async def model_ready(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_ready(model_name, None))

    @router.get(f"{VERSION_PATH}/ready", summary="Model version readiness", **openapi.MODEL_READY)
    async def version_ready(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_ready(model_name, model_version))

    @router.get(
        f"{MODEL_PATH}/config", summary="Model configuration (Triton)", **openapi.MODEL_CONFIG
    )
    async def config(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_config(model_name, None))

    @router.get(
        f"{VERSION_PATH}/config", summary="Model version configuration", **openapi.MODEL_CONFIG
    )
    async def version_config(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_config(model_name, model_version))

    @router.get(f"{MODEL_PATH}/package", summary="Package report", **openapi.PACKAGE_REPORT)
    async def package(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.package_report(model_name, None))

    @router.get(
        f"{VERSION_PATH}/package", summary="Package report of a version", **openapi.PACKAGE_REPORT
    )
    async def version_package(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.package_report(model_name, model_version))

    @router.get(
        f"{MODEL_PATH}/drift",
        summary="BatchNorm drift of live traffic",
        response_model=DriftResponse,
        **openapi.DRIFT,
    )
    async def drift(
        model_name: str, dataplane: DataPlaneDep, channels: ChannelsQuery = False
    ) -> Response:
        return json_response(dataplane.drift_report(model_name, None, channels))

    @router.get(
        f"{VERSION_PATH}/drift",
        summary="BatchNorm drift of a version's live traffic",
        response_model=DriftResponse,
        **openapi.DRIFT,
    )
    async def version_drift(
        model_name: str,
        model_version: str,
        dataplane: DataPlaneDep,
        channels: ChannelsQuery = False,
    ) -> Response:
        return json_response(dataplane.drift_report(model_name, model_version, channels))

    return router


async def infer_request(request: Request, name: str, version: str | None) -> Response:
    """Decode, `DataPlane.predict`, encode; a client that disconnects while its request waits
    cancels it (`disconnects`: dropped from the queue, never run) and gets no answer."""
    dataplane = dataplane_of(request)
    watch = disconnect_watcher(request).watch(request)
    tracing = dataplane.tracing  # the headers only for a span: a mapping built per request
    carrier = request.headers if tracing is not None else {}
    span = request_span(tracing, "infer", "http", name, version, carrier)
    try:
        with span, dataplane.metrics.track(dataplane.model_label(name), "infer"):
            dataplane.admit_infer(name, version)
            reading = time.perf_counter_ns()
            async with decoded_body(request) as decoded:
                decode_ns = time.perf_counter_ns() - reading
                span.decoded(decode_ns)
                span.identify(decoded.id)
                adopt_body_id(decoded.id)
                with watch:
                    prediction = await dataplane.predict(
                        name,
                        version,
                        decoded.inputs,
                        request_output_names(decoded),
                        decoded.finite,
                    )
                note_model(prediction.model.name, prediction.model.version)
                span.predicted(prediction)
                encoding = time.perf_counter_ns()
                try:
                    encoded = encode_prediction(prediction, decoded)
                except Exception:
                    dataplane.record_failure(prediction, time.perf_counter_ns() - reading)
                    raise
                encode_ns = time.perf_counter_ns() - encoding
                dataplane.record_success(prediction, decode_ns, encode_ns)
                span.encoded(encode_ns)
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise
        forget_cancellation()
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: uvicorn drops it
    return inference_response(encoded)


async def _compare(request: Request, name: str, version: str | None) -> Response:
    """A V2 body as inference decodes it, or a .npy/.npz body (`arrays`) mapped to the
    model's input names; either way the data plane checks the tensors against the model."""
    dataplane = dataplane_of(request)
    span = request_span(dataplane.tracing, "compare", "http", name, version, request.headers)
    with span, dataplane.metrics.track(dataplane.model_label(name), "compare"):
        options = CompareOptions.from_query(request.query_params)
        dataplane.admit_compare(name, version)
        kind = array_body_kind(request)
        reading = time.perf_counter_ns()
        if kind is None:
            async with decoded_body(request) as decoded:
                running = time.perf_counter_ns()
                span.decoded(running - reading)
                span.identify(decoded.id)
                adopt_body_id(decoded.id)
                report = await dataplane.compare(name, version, decoded, options)
        else:
            async with held_arrays(request, kind) as arrays:
                inputs = inputs_by_name(arrays, dataplane.input_names(name, version))
                running = time.perf_counter_ns()
                span.decoded(running - reading)
                report = await dataplane.compare(name, version, array_request(inputs), options)
        span.ran(time.perf_counter_ns() - running)
        note_model(report["model_name"], report["model_version"])
    return json_response(report)


def inference_routes() -> APIRouter:
    router = APIRouter(tags=["inference"], route_class=DirectRoute)

    @router.post(f"{MODEL_PATH}/infer", summary="Inference", **openapi.INFER)
    async def infer(model_name: str, request: Request) -> Response:
        return await infer_request(request, model_name, None)

    @router.post(f"{VERSION_PATH}/infer", summary="Inference on a version", **openapi.INFER)
    async def version_infer(model_name: str, model_version: str, request: Request) -> Response:
        return await infer_request(request, model_name, model_version)

    @router.post(f"{MODEL_PATH}/compare", summary="Train vs eval comparison", **openapi.COMPARE)
    async def compare(model_name: str, request: Request) -> Response:
        return await _compare(request, model_name, None)

    @router.post(f"{VERSION_PATH}/compare", summary="Train vs eval on a version", **openapi.COMPARE)
    async def version_compare(model_name: str, model_version: str, request: Request) -> Response:
        return await _compare(request, model_name, model_version)

    return router


def repository_routes() -> APIRouter:
    router = APIRouter(tags=["model repository"])

    @router.post(
        "/v2/repository/index",
        summary="Repository index",
        response_model=list[RepositoryModel],
        **openapi.REPOSITORY_INDEX,
    )
    async def index(request: Request, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.repository_index(await index_ready_only(request)))

    @router.post(
        "/v2/repository/models/{model_name}/load",
        summary="Load or reload a model (admin)",
        name="load",
        dependencies=[Depends(require_admin)],
        **openapi.REPOSITORY_LOAD,
    )
    async def load(model_name: str, request: Request, dataplane: DataPlaneDep) -> Response:
        await dataplane.load(model_name, await load_config(request))
        return json_response({})

    @router.post(
        "/v2/repository/models/{model_name}/unload",
        summary="Unload a model (admin)",
        name="unload",
        dependencies=[Depends(require_admin)],
        **openapi.REPOSITORY_UNLOAD,
    )
    async def unload(model_name: str, request: Request, dataplane: DataPlaneDep) -> Response:
        await json_body(request)
        await dataplane.unload(model_name)
        return json_response({})

    for action in ("load", "unload"):
        _version_admin_route(router, action)

    return router


def _version_admin_route(router: APIRouter, action: Literal["load", "unload"]) -> None:
    """POST /v2/repository/models/{model_name}/versions/{model_version}/<action> (admin): one
    version beside the others. Loading a new version rolls forward under the `latest` version
    policy; unloading it rolls back. A bnfold extension: Triton loads whole models."""

    async def endpoint(
        model_name: str, model_version: str, request: Request, dataplane: DataPlaneDep
    ) -> Response:
        await check_load_body(request)
        await getattr(dataplane, f"{action}_version")(model_name, model_version)
        return json_response({})

    router.post(
        f"/v2/repository/models/{{model_name}}/versions/{{model_version}}/{action}",
        summary=f"{action.capitalize()} one version of a model (admin)",
        name=f"{action}_version",
        dependencies=[Depends(require_admin)],
        **(
            openapi.REPOSITORY_LOAD_VERSION
            if action == "load"
            else openapi.REPOSITORY_UNLOAD_VERSION
        ),
    )(endpoint)
