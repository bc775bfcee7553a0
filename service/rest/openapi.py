"""The OpenAPI document: the prose, examples and error responses of each route, and the schema.

The routes take raw bodies (`routes`), so FastAPI cannot derive their request
schemas: each route's entry here names its pydantic model from `protocol` and
`install_openapi` adds every wire model to the components. Only documentation
lives here; nothing in it runs per request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bnfold.service.protocol import (
    WIRE_MODELS,
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelConfigResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ModelStatisticsResponse,
    PackageReportResponse,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
)
from bnfold.service.rest.arrays import NPY_TYPES, NPZ_TYPES
from bnfold.service.rest.responses import JSON

TITLE = "bnfold"
DESCRIPTION = (
    "KServe V2 / Open Inference Protocol inference on BatchNorm-folded ONNX packages, with "
    "Triton's binary tensor, model configuration, repository and statistics extensions, a "
    "train-vs-eval comparison endpoint, and BatchNorm drift monitoring of live traffic. "
    "Every response carries an `X-Request-ID` header (the client's, when it sent a valid one), "
    "and every error body its `request_id`."
)

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


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses for these statuses."""
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


def _request_body(model: type[BaseModel], examples: dict[str, Any]) -> dict[str, Any]:
    """A required body: `model` as JSON, or Triton's binary tensor form."""
    content: dict[str, Any] = {
        JSON: {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
            "examples": {name: {"value": value} for name, value in examples.items()},
        },
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Triton binary tensor data extension: a JSON header of "
            "`Inference-Header-Content-Length` bytes, then each input with "
            "`parameters.binary_data_size` as raw little-endian bytes, in input order.",
        },
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


MODEL_METADATA: dict[str, Any] = {
    "response_model": ModelMetadataResponse,
    "responses": errors(404, 503),
    "description": "Inputs and outputs with datatypes and shapes (-1: dynamic), the "
    "platform, the ready versions and the execution providers in use. Without a "
    "version the highest ready version answers.",
}

MODEL_READY: dict[str, Any] = {
    "response_model": ModelReadyResponse,
    "responses": errors(404, 503),
    "description": "200 when the model (version) can serve; 503 with the reason if not.",
}

MODEL_CONFIG: dict[str, Any] = {
    "response_model": ModelConfigResponse,
    "responses": errors(404, 503),
    "description": "Triton's model configuration for this onnxruntime model "
    "(max_batch_size 0: dims include the -1 batch axis).",
}

MODEL_STATISTICS: dict[str, Any] = {
    "response_model": ModelStatisticsResponse,
    "responses": errors(404),
    "description": "Triton's statistics extension: per loaded version, successful rows "
    "(inference_count), onnxruntime runs (execution_count), per-request success / fail / "
    "queue / compute times, runs by batch size. Counted since the version was loaded.",
}

INFER: dict[str, Any] = {
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
        **errors(400, 404, 413, 422, 503),
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
    ),
    "description": "KServe V2 inference on model.onnx (eval mode, BatchNorm folded). "
    "Tensors as JSON (`data` flat or nested, row-major) or as Triton binary tensor data.",
}


def _flag(name: str, description: str) -> dict[str, Any]:
    """A boolean query parameter (`true` or `false`) of a route whose signature cannot
    declare it (`DirectRoute`)."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": description,
    }


def _compare_extra() -> dict[str, Any]:
    """compare's bodies (V2 JSON, binary tensors, .npy, .npz) and its query flags."""
    extra = _request_body(
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
                "parameters": {"channels": True},
            }
        },
    )
    content = extra["requestBody"]["content"]
    content[NPY_TYPES[1]]["description"] += (
        " Without that header, the body is a .npy array as for application/x-npy."
    )
    content[NPY_TYPES[0]] = {
        "schema": {"type": "string", "format": "binary"},
        "description": "One .npy array (np.save): the input of a one-input model. Options "
        "in the query string.",
    }
    content[NPZ_TYPES[0]] = {
        "schema": {"type": "string", "format": "binary"},
        "description": "An .npz (np.savez, np.savez_compressed; also as application/zip): one "
        "array per input name; a one-input model also takes a single array of any name. At "
        "most 64 members, inflating to at most the decode budget (max_decode_bytes, 413 "
        "above). Options in the query string.",
    }
    extra["parameters"] = [
        _flag("channels", "Also return each BatchNorm layer's per-channel values."),
        _flag("return_outputs", "Also return both modes' outputs (JSON tensors)."),
    ]
    return extra


COMPARE: dict[str, Any] = {
    "response_model": CompareResponse,
    "responses": errors(400, 404, 413, 422, 503),
    "openapi_extra": _compare_extra(),
    "description": "Runs model.onnx (eval: running statistics) and train.onnx (train: "
    "batch statistics) on the same batch. Per output: max/mean absolute difference, "
    "relative L2, cosine similarity, argmax agreement. Per BatchNorm layer, worst "
    "first: batch mean vs running mean in running standard deviations, batch/running "
    "variance ratio, KL divergence; with `channels`, each channel's batch mean and "
    "variance, mean shift and KL. The batch needs more than one value per BN channel "
    "(422 otherwise). The body is V2 tensors (JSON or binary), one .npy array (one-input "
    "models) or an .npz of arrays by input name; the arrays must fit the model as V2 "
    "tensors do (422). Stateless: eval results never change.",
}

PACKAGE_REPORT: dict[str, Any] = {
    "response_model": PackageReportResponse,
    "responses": errors(404, 503),
    "description": "The manifest the version was verified and loaded with: which BatchNorm "
    "layers were folded into what and which were kept and why, their running statistics, "
    "the verification of the folded graphs against the source, inputs and outputs, the "
    "source, tool versions, creation time and the recalibrations that led to it. Without "
    "a version: the version unversioned inference hits. Read at load time, never from "
    "the disk at request time.",
}

DRIFT: dict[str, Any] = {
    "responses": errors(400, 404, 503),
    "description": "How far the inputs of each BatchNorm, measured on a sample of this "
    "version's inference traffic (`drift_sample_fraction`) over the last "
    "`drift_window_seconds`, sit from the package's running statistics: compare's "
    "measures (mean shift in running stds, variance ratio, KL) between the pooled "
    "per-channel mean and variance and the running ones, worst layer first, and a "
    "verdict (layers whose mean KL exceeds `drift_kl_threshold`). Without a version: "
    "the version unversioned inference hits. `available` is false, with the reason, for "
    "packages without calibration.onnx (schema 1) or with monitoring off. "
    "`?channels=true` adds the per-channel values.",
}

REPOSITORY_INDEX: dict[str, Any] = {
    "responses": errors(400),
    "openapi_extra": _optional_body(RepositoryIndexRequest, {"ready": False}),
    "description": "Every package version with its state; unavailable ones carry the reason "
    "(a hash mismatch, a missing file, an admin unload...).",
}

_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    403: {"model": ErrorResponse, "description": "Admin endpoints disabled (no token set)."},
    **errors(400, 404, 503),
}

REPOSITORY_LOAD: dict[str, Any] = {
    "responses": _ADMIN_RESPONSES,
    "openapi_extra": _optional_body(
        RepositoryLoadRequest,
        {"parameters": {"config": '{"max_batch_size": 16}'}},
    ),
    "description": "Re-reads every version of the model from the repository, checking the "
    "manifest and hashes again; `parameters.config` overrides the batching fields of its "
    "configuration (Triton's). Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`.",
}

REPOSITORY_UNLOAD: dict[str, Any] = {
    "responses": _ADMIN_RESPONSES,
    "openapi_extra": _optional_body(RepositoryLoadRequest, {}),
    "description": "Stops serving every version of the model (in-flight requests finish). "
    "Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`.",
}


REPOSITORY_LOAD_VERSION: dict[str, Any] = {
    "responses": _ADMIN_RESPONSES,
    "openapi_extra": _optional_body(RepositoryLoadRequest, {}),
    "description": "Loads one version from the repository beside the versions already served "
    "(their sessions stay). Under the `latest` version policy unversioned requests move to it "
    "when it is the highest. Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`.",
}

REPOSITORY_UNLOAD_VERSION: dict[str, Any] = {
    "responses": _ADMIN_RESPONSES,
    "openapi_extra": _optional_body(RepositoryLoadRequest, {}),
    "description": "Stops serving one version (in-flight requests finish on it): unloading a "
    "recalibrated version rolls back to the previous one. For good, delete its directory. "
    "Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`.",
}


def install_openapi(app: FastAPI) -> None:
    """Build `app`'s schema once, on first request, with every wire model in its components."""

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
