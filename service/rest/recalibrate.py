"""POST /v2/repository/models/{m}/recalibrate: read the calibration inputs, hand them over.

Three bodies, told apart by Content-Type and content:

* a .npy (`application/x-npy`, or `application/octet-stream` without
  `Inference-Header-Content-Length`): one array, the inputs of a one-input
  model; or an .npz (`application/x-npz`, `application/zip`): one array per
  input name (`arrays`, as compare reads them); options in the query string
  (`?method=batch&version=1&max_samples=256&batch_size=32`);
* a V2 inference body (JSON, or JSON plus binary tensors with
  `Inference-Header-Content-Length`): the inputs by name, options in
  `parameters`;
* a JSON body without inputs whose `parameters.source` is `"reservoir"`: the
  live inputs the drift monitor kept (`--drift-reservoir-samples`).

The body counts against the body limit and the decode budget like an inference
body. The work itself is `Recalibrations.run` (service/recalibration.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from bnfold.service.codec import decode_request, parse_json_object
from bnfold.service.errors import BadRequest, Unavailable
from bnfold.service.recalibration import RESERVOIR, RecalibrationOptions, Recalibrations
from bnfold.service.rest.arrays import NPY_TYPES, NPZ_TYPES, array_body_kind, held_arrays
from bnfold.service.rest.bodies import frozen, held_body, run_sized
from bnfold.service.rest.requests import require_admin
from bnfold.service.rest.responses import json_response

RECALIBRATE_DOCS: dict[str, Any] = {
    "description": (
        "Re-estimates the model's BatchNorm running statistics on unlabeled inputs (a .npy "
        "or .npz body, V2 tensors, or the live-input reservoir), re-folds and verifies them "
        "into a new version written beside the old one, loads it, and answers with each "
        "layer's drift "
        "before and after. Under the `latest` version policy unversioned requests move to the "
        "new version; unloading it "
        "(`POST /v2/repository/models/{m}/versions/{v}/unload`) rolls back. One recalibration "
        "per model at a time (409 otherwise). Needs `Authorization: Bearer <BNFOLD_ADMIN_TOKEN>`."
    ),
    "responses": {
        401: {"description": "Missing or wrong admin token"},
        403: {"description": "Admin endpoints are off (no BNFOLD_ADMIN_TOKEN)"},
        404: {"description": "Unknown model or version"},
        409: {"description": "Already running, not recalibratable, reservoir off or empty"},
        422: {"description": "The inputs do not fit the model (shape, datatype, NaN, too few)"},
    },
}


def recalibrations_of(request: Request) -> Recalibrations:
    recalibrations = getattr(request.app.state, "recalibrations", None)
    if recalibrations is None:
        raise Unavailable("the server is starting")
    return recalibrations


async def read_recalibration(
    request: Request,
) -> tuple[np.ndarray | dict[str, np.ndarray] | None, RecalibrationOptions, str]:
    """(inputs or None for the reservoir, options, what the manifest records as the data)."""
    settings = request.app.state.settings
    kind = array_body_kind(request)
    if kind is not None:
        options = RecalibrationOptions.parse(dict(request.query_params))
        async with held_arrays(request, kind) as arrays:
            return arrays, options, f"a .{kind} request body"
    async with held_body(request, settings.max_body_bytes, request.app.state.decode_budget) as (
        body,
        header_length,
    ):
        json_end = len(body) if header_length is None else header_length
        fields = await run_sized(json_end, parse_json_object, memoryview(body)[:json_end])
        carries_inputs = "inputs" in fields
        parameters = fields.get("parameters") or {}
        del fields  # decode_request parses the JSON again: one parse alive, as estimated
        if not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be a JSON object")
        parameters = {**dict(request.query_params), **parameters}
        source = parameters.get("source")
        options = RecalibrationOptions.parse(
            {key: value for key, value in parameters.items() if key != "binary_data_output"}
        )
        if not carries_inputs:
            if source != RESERVOIR:
                raise BadRequest(
                    f"send the calibration inputs (V2 'inputs', a .npy body with Content-Type "
                    f"{NPY_TYPES[0]} or an .npz with {NPZ_TYPES[0]}), or parameters.source = "
                    f"'{RESERVOIR}' for the live inputs the server kept"
                )
            return None, options, "live inputs (reservoir)"
        if source not in (None, "request"):
            raise BadRequest(f"parameters.source is {source!r} but the body carries inputs")
        decoded = await run_sized(len(body), decode_request, frozen(body), header_length)
        return decoded.inputs, options, "V2 tensors in the request"


def recalibration_routes() -> APIRouter:
    router = APIRouter(tags=["model repository"])

    @router.post(
        "/v2/repository/models/{model_name}/recalibrate",
        summary="Recalibrate a model's BatchNorm statistics and roll forward (admin)",
        dependencies=[Depends(require_admin)],
        **RECALIBRATE_DOCS,
    )
    async def recalibrate(model_name: str, request: Request) -> Response:
        recalibrations = recalibrations_of(request)
        inputs, options, label = await read_recalibration(request)
        report = await recalibrations.run(model_name, options, inputs, label)
        return json_response(report)

    return router
