"""What a route takes from its request: the app's data plane, the body, admin rights.

Shared state lives on `app.state` (set by `create_app` and its lifespan), never
in module globals. Bodies are read within the app's body limit and decode
budget (`bodies`). `DataPlaneDep` and `require_admin` are FastAPI dependencies
for ordinary routes; the `DirectRoute` endpoints (inference, compare) call
`dataplane_of` instead, since they may not declare dependencies.
`disconnect_watcher` notices a client that goes away while its inference waits.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import Depends, Request

from bnfold.service.codec import DecodedRequest
from bnfold.service.dataplane import DataPlane
from bnfold.service.errors import BadRequest, Forbidden, Unauthorized, Unavailable
from bnfold.service.load_config import decode_config_parameter
from bnfold.service.rest.bodies import DecodedRequestBlock, read_json_object
from bnfold.service.rest.disconnects import DisconnectWatcher


def dataplane_of(request: Request) -> DataPlane:
    """The app's data plane; 503 until the lifespan has built it."""
    dataplane = getattr(request.app.state, "dataplane", None)
    if dataplane is None:
        raise Unavailable("the server is starting")
    return dataplane


def decoded_body(request: Request) -> AbstractAsyncContextManager[DecodedRequest]:
    """The inference request in the body, within the app's body limit and decode budget."""
    state = request.app.state
    return DecodedRequestBlock(request, state.settings.max_body_bytes, state.decode_budget)


async def json_body(request: Request) -> dict[str, Any]:
    """The body as one JSON object (empty: `{}`), within the same limits."""
    state = request.app.state
    return await read_json_object(request, state.settings.max_body_bytes, state.decode_budget)


async def index_ready_only(request: Request) -> bool:
    """The repository index body's `ready` flag: list only ready versions (absent: false)."""
    ready_only = (await json_body(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequest("'ready' must be a boolean")
    return ready_only


async def _load_parameters(request: Request) -> dict[str, Any]:
    parameters = (await json_body(request)).get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be a JSON object")
    return parameters


def _refuse_parameters(names: Any, allowed: str) -> None:
    raise BadRequest(
        f"load takes {allowed}: packages come from the repository on disk, "
        f"not from the request (got {', '.join(sorted(names))})"
    )


async def check_load_body(request: Request) -> None:
    """A version load body: empty, or empty `parameters`; packages come from the disk."""
    parameters = await _load_parameters(request)
    if parameters:
        _refuse_parameters(parameters, "no parameters")


async def load_config(request: Request) -> Mapping[str, Any] | None:
    """A model load body's Triton config override (`parameters.config`, a JSON string, as
    tritonclient's `load_model(name, config=...)` sends it), None without one. Any other
    parameter (Triton's `file:` model files) is refused: packages come from the disk."""
    parameters = await _load_parameters(request)
    others = [name for name in parameters if name != "config"]
    if others:
        _refuse_parameters(others, "no parameter but 'config'")
    config = parameters.get("config")
    return None if config is None else decode_config_parameter(config)


def disconnect_watcher(request: Request) -> DisconnectWatcher:
    """The app's `DisconnectWatcher`, made on first use (it needs the running event loop)."""
    state = request.app.state
    watcher = getattr(state, "disconnect_watcher", None)
    if watcher is None:
        watcher = state.disconnect_watcher = DisconnectWatcher()
    return watcher


async def get_dataplane(request: Request) -> DataPlane:
    return dataplane_of(request)


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
