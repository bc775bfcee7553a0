"""The FastAPI app: `create_app(settings)`, the lifespan that loads the repository, thin routes.

Routes read the body themselves (`bodies`: the size limit holds for chunked
uploads too, decoding within the memory budget), hand it to `DataPlane`, and
answer with orjson bytes.
They never let FastAPI validate a tensor body: the pydantic models in
`protocol` only document the wire format (see /docs).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

from bnfold.service import errors
from bnfold.service.batching import Batcher
from bnfold.service.bodies import (
    DecodeBudget,
    decoded_request,
    fix_malloc_thresholds,
    read_json_object,
)
from bnfold.service.codec import EncodedResponse, dumps, encode_response
from bnfold.service.dataplane import DataPlane, server_version
from bnfold.service.errors import (
    BadRequest,
    Forbidden,
    Unauthorized,
    Unavailable,
)
from bnfold.service.metrics import CONTENT_TYPE, ServiceMetrics
from bnfold.service.protocol import (
    INFERENCE_HEADER,
    WIRE_MODELS,
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelConfigResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ReadyResponse,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    RepositoryModel,
    ServerMetadataResponse,
)
from bnfold.service.providers import resolve_providers
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.runs import ExecutorRunner
from bnfold.service.settings import LogLevel, Settings

logger = logging.getLogger("bnfold.service")

JSON = "application/json"


# ---------------------------------------------------------------- request plumbing


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(content=dumps(payload), status_code=status_code, media_type=JSON)


def inference_response(encoded: EncodedResponse) -> Response:
    if encoded.header_length is None:
        return Response(content=encoded.body, media_type=JSON)
    return Response(
        content=encoded.body,
        media_type="application/octet-stream",
        headers={INFERENCE_HEADER: str(encoded.header_length)},
    )


def app_dataplane(request: Request) -> DataPlane:
    dataplane = getattr(request.app.state, "dataplane", None)
    if dataplane is None:
        raise Unavailable("the server is starting")
    return dataplane


async def get_dataplane(request: Request) -> DataPlane:
    return app_dataplane(request)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def require_admin(request: Request) -> None:
    """Admin endpoints: off without a configured token, else `Authorization: Bearer <token>`."""
    token = request.app.state.settings.admin_token
    if token is None:
        raise Forbidden(
            "admin endpoints are disabled: start the server with BNFOLD_ADMIN_TOKEN "
            "(or --admin-token) to enable load and unload"
        )
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("this admin endpoint needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(credentials.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("wrong admin token")


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


class DirectRoute(APIRoute):
    """A route whose endpoint takes the `Request` (and path parameters) and returns a `Response`.

    For the inference and compare endpoints: FastAPI's dependency solving and
    response handling cost more per request than everything bnfold does for a
    small model (measured: BENCHMARKS.md). The endpoint's signature still
    documents the route in OpenAPI; errors still reach the one exception
    handler. Endpoints on this route class may not declare dependencies.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request=request, **request.path_params)

        return handler


# ---------------------------------------------------------------- OpenAPI helpers

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed JSON, tensor or parameter.",
        404: "Unknown model or version.",
        413: "Body over the size limit.",
        422: "Tensors do not fit the model (names, datatypes, shapes; the expected shape is in "
        "the message) or, for compare, a batch without statistics.",
        503: "Model or server not ready.",
    }.items()
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: _ERRORS[status] for status in statuses}


_MLP_EXAMPLE = {
    "id": "request-1",
    "inputs": [
        {
            "name": "input",
            "shape": [2, 64],
            "datatype": "FP32",
            "data": [[0.0] * 64, [0.5] * 64],
        }
    ],
    "outputs": [{"name": "output"}],
}


def _request_body(model: type[BaseModel], examples: dict[str, Any], binary: bool) -> dict[str, Any]:
    content: dict[str, Any] = {
        JSON: {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
            "examples": {name: {"value": value} for name, value in examples.items()},
        }
    }
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "Triton binary tensor data extension: a JSON header of "
            "`Inference-Header-Content-Length` bytes, then each input with "
            "`parameters.binary_data_size` as raw little-endian bytes, in input order.",
        }
    return {"requestBody": {"required": True, "content": content}}


def _optional_body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": False,
            "content": {
                JSON: {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
                    "example": example,
                }
            },
        }
    }


# ---------------------------------------------------------------- routes


def _health_routes() -> APIRouter:
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
        summary="Readiness: 200 once the repository is loaded, 503 before and while shutting down",
        responses=_errors(503),
    )
    async def ready(dataplane: DataPlaneDep) -> Response:
        dataplane.check_ready()
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


def _model_routes() -> APIRouter:
    router = APIRouter(tags=["models"])
    model_path = "/v2/models/{model_name}"
    version_path = "/v2/models/{model_name}/versions/{model_version}"

    metadata_doc: dict[str, Any] = {
        "response_model": ModelMetadataResponse,
        "responses": _errors(404, 503),
        "description": "Inputs and outputs with datatypes and shapes (-1: dynamic), the "
        "platform, the ready versions and the execution providers in use. Without a "
        "version the highest ready version answers.",
    }

    @router.get(model_path, summary="Model metadata", **metadata_doc)
    async def metadata(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_metadata(model_name, None))

    @router.get(version_path, summary="Model version metadata", **metadata_doc)
    async def version_metadata(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_metadata(model_name, model_version))

    ready_doc: dict[str, Any] = {
        "response_model": ModelReadyResponse,
        "responses": _errors(404, 503),
        "description": "200 when the model (version) can serve; 503 with the reason if not.",
    }

    @router.get(f"{model_path}/ready", summary="Model readiness", **ready_doc)
    async def model_ready(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_ready(model_name, None))

    @router.get(f"{version_path}/ready", summary="Model version readiness", **ready_doc)
    async def version_ready(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_ready(model_name, model_version))

    config_doc: dict[str, Any] = {
        "response_model": ModelConfigResponse,
        "responses": _errors(404, 503),
        "description": "Triton's model configuration for this onnxruntime model "
        "(max_batch_size 0: dims include the -1 batch axis).",
    }

    @router.get(f"{model_path}/config", summary="Model configuration (Triton)", **config_doc)
    async def config(model_name: str, dataplane: DataPlaneDep) -> Response:
        return json_response(dataplane.model_config(model_name, None))

    @router.get(f"{version_path}/config", summary="Model version configuration", **config_doc)
    async def version_config(
        model_name: str, model_version: str, dataplane: DataPlaneDep
    ) -> Response:
        return json_response(dataplane.model_config(model_name, model_version))

    return router


def _inference_routes() -> APIRouter:
    router = APIRouter(tags=["inference"], route_class=DirectRoute)
    model_path = "/v2/models/{model_name}"
    version_path = "/v2/models/{model_name}/versions/{model_version}"

    async def run_infer(request: Request, name: str, version: str | None) -> Response:
        dataplane = app_dataplane(request)
        settings: Settings = request.app.state.settings
        budget: DecodeBudget = request.app.state.decode_budget
        with dataplane.metrics.track(dataplane.model_label(name), "infer"):
            dataplane.admit_infer(name, version)
            async with decoded_request(request, settings.max_body_bytes, budget) as decoded:
                result = await dataplane.infer(name, version, decoded)
                header: dict[str, Any] = {
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                }
                if result.id is not None:
                    header["id"] = result.id
                encoded = encode_response(
                    header,
                    [
                        (out_name, array, decoded.binary_for(out_name))
                        for out_name, array in result.outputs
                    ],
                )
        return inference_response(encoded)

    infer_doc: dict[str, Any] = {
        "response_model": InferenceResponse,
        "responses": {
            200: {
                "content": {
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                        "description": "When an output asks for binary_data: the JSON header "
                        "(Inference-Header-Content-Length bytes), then the outputs' raw bytes.",
                    }
                }
            },
            **_errors(400, 404, 413, 422, 503),
        },
        "openapi_extra": _request_body(
            InferenceRequest,
            {
                "json": _MLP_EXAMPLE,
                "binary outputs": {
                    **_MLP_EXAMPLE,
                    "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
                },
            },
            binary=True,
        ),
        "description": "KServe V2 inference on model.onnx (eval mode, BatchNorm folded). "
        "Tensors as JSON (`data` flat or nested, row-major) or as Triton binary tensor data.",
    }

    @router.post(f"{model_path}/infer", summary="Inference", **infer_doc)
    async def infer(model_name: str, request: Request) -> Response:
        return await run_infer(request, model_name, None)

    @router.post(f"{version_path}/infer", summary="Inference on a version", **infer_doc)
    async def version_infer(model_name: str, model_version: str, request: Request) -> Response:
        return await run_infer(request, model_name, model_version)

    async def run_compare(request: Request, name: str, version: str | None) -> Response:
        dataplane = app_dataplane(request)
        settings: Settings = request.app.state.settings
        budget: DecodeBudget = request.app.state.decode_budget
        with dataplane.metrics.track(dataplane.model_label(name), "compare"):
            dataplane.admit_compare(name, version)
            async with decoded_request(request, settings.max_body_bytes, budget) as decoded:
                report = await dataplane.compare(name, version, decoded)
        return json_response(report)

    compare_doc: dict[str, Any] = {
        "response_model": CompareResponse,
        "responses": _errors(400, 404, 413, 422, 503),
        "openapi_extra": _request_body(
            CompareRequest,
            {
                "compare": {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [2, 64],
                            "datatype": "FP32",
                            "data": [[0.1] * 64, [0.6] * 64],
                        }
                    ],
                    "return_outputs": False,
                }
            },
            binary=True,
        ),
        "description": "Runs model.onnx (eval: running statistics) and train.onnx (train: "
        "batch statistics) on the same batch. Per output: max/mean absolute difference, "
        "relative L2, cosine similarity, argmax agreement. Per BatchNorm layer, worst "
        "first: batch mean vs running mean in running standard deviations, batch/running "
        "variance ratio, KL divergence. The batch needs more than one value per BN "
        "channel (422 otherwise). Stateless: eval results never change.",
    }

    @router.post(f"{model_path}/compare", summary="Train vs eval comparison", **compare_doc)
    async def compare(model_name: str, request: Request) -> Response:
        return await run_compare(request, model_name, None)

    @router.post(f"{version_path}/compare", summary="Train vs eval on a version", **compare_doc)
    async def version_compare(model_name: str, model_version: str, request: Request) -> Response:
        return await run_compare(request, model_name, model_version)

    return router


def _repository_routes() -> APIRouter:
    router = APIRouter(tags=["model repository"])

    @router.post(
        "/v2/repository/index",
        summary="Repository index",
        response_model=list[RepositoryModel],
        responses=_errors(400),
        openapi_extra=_optional_body(RepositoryIndexRequest, {"ready": False}),
        description="Every package version with its state; unavailable ones carry the reason "
        "(a hash mismatch, a missing file, an admin unload...).",
    )
    async def index(request: Request, dataplane: DataPlaneDep, settings: SettingsDep) -> Response:
        fields = await read_json_object(
            request, settings.max_body_bytes, request.app.state.decode_budget
        )
        ready_only = fields.get("ready", False)
        if not isinstance(ready_only, bool):
            raise BadRequest("'ready' must be a boolean")
        return json_response(dataplane.repository_index(ready_only))

    admin_responses = {
        401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
        403: {"model": ErrorResponse, "description": "Admin endpoints disabled (no token set)."},
        **_errors(400, 404, 503),
    }

    @router.post(
        "/v2/repository/models/{model_name}/load",
        summary="Load or reload a model (admin)",
        dependencies=[Depends(require_admin)],
        responses=admin_responses,
        openapi_extra=_optional_body(RepositoryLoadRequest, {}),
        description="Re-reads every version of the model from the repository, checking the "
        "manifest and hashes again. Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`.",
    )
    async def load(
        model_name: str, request: Request, dataplane: DataPlaneDep, settings: SettingsDep
    ) -> Response:
        fields = await read_json_object(
            request, settings.max_body_bytes, request.app.state.decode_budget
        )
        parameters = fields.get("parameters", {})
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be a JSON object")
        if parameters:
            raise BadRequest(
                "load takes no parameters: packages come from the repository on disk, "
                f"not from the request (got {', '.join(sorted(parameters))})"
            )
        await dataplane.load(model_name)
        return json_response({})

    @router.post(
        "/v2/repository/models/{model_name}/unload",
        summary="Unload a model (admin)",
        dependencies=[Depends(require_admin)],
        responses=admin_responses,
        openapi_extra=_optional_body(RepositoryLoadRequest, {}),
        description="Stops serving every version of the model (in-flight requests finish). "
        "Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`.",
    )
    async def unload(
        model_name: str, request: Request, dataplane: DataPlaneDep, settings: SettingsDep
    ) -> Response:
        await read_json_object(request, settings.max_body_bytes, request.app.state.decode_budget)
        await dataplane.unload(model_name)
        return json_response({})

    return router


# ---------------------------------------------------------------- the app


def _lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start-up: choose providers, load the repository (in a thread); shut-down: drain runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        providers = await asyncio.to_thread(resolve_providers, settings.device)
        registry = ModelRegistry(
            settings.repository, settings.session_config(providers), settings.batching
        )
        executor = ThreadPoolExecutor(settings.run_slots, thread_name_prefix="bnfold-compare")
        metrics: ServiceMetrics = app.state.metrics
        batcher = Batcher(metrics, slots=settings.run_slots)
        dataplane = DataPlane(registry, ExecutorRunner(executor, metrics), batcher, metrics)
        app.state.dataplane = dataplane
        index = await asyncio.to_thread(registry.load_all)
        ready = sum(entry.state is ModelState.READY for entry in index)
        logger.info(
            "serving %s: %d of %d package versions ready, providers %s, %d concurrent run(s) x "
            "%d thread(s), started in %.2f s",
            settings.repository,
            ready,
            len(index),
            ", ".join(providers),
            settings.run_slots,
            settings.session_threads,
            time.perf_counter() - started,
        )
        dataplane.ready = True
        try:
            yield
        finally:
            dataplane.ready = False
            batcher.close()
            await asyncio.to_thread(executor.shutdown, wait=True)

    return lifespan


def create_app(settings: Settings) -> FastAPI:
    """The service for `settings`; models load when the app starts (its lifespan)."""
    app = FastAPI(
        title="bnfold",
        version=server_version(),
        description="KServe V2 / Open Inference Protocol inference on BatchNorm-folded ONNX "
        "packages, with Triton's binary tensor, model configuration and repository "
        "extensions, and a train-vs-eval comparison endpoint.",
        lifespan=_lifespan(settings),
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    fix_malloc_thresholds()
    app.state.decode_budget = DecodeBudget(settings.decode_budget)
    errors.install(app)
    for router in (_inference_routes(), _health_routes(), _model_routes(), _repository_routes()):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _, definitions = models_json_schema(
                [(model, "validation") for model in WIRE_MODELS],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def configure_logging(level: LogLevel) -> None:
    logging.basicConfig(
        level=level.value.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )


def create_app_from_env() -> FastAPI:
    """The app for `BNFOLD_*` environment variables alone: uvicorn's factory for `--workers` > 1,
    where every worker process builds its own app (and loads every model itself)."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
