"""The inference lane: POST .../infer answered in front of FastAPI, in one coroutine.

`BnfoldApp` (app.py) hands an infer request here when `inference_target` matches its
path. FastAPI's layers (its telemetry and body-limit wrappers, Starlette's
server-error middleware, exception middleware, exit stack, route matching, the
endpoint wrapper) each wrap the request and its `send`, and so did the app's own
middleware (request ids and access log, `LastResort`): for the digits MLP that
plumbing cost the event loop several times the model's run (BENCHMARKS.md, the
tiny-model gap). The lane does what those did for an infer request, with no
wrapper around `send`: the request's context and id, `infer_request` (the route's
own code, so errors get the exception handler's response), the id on the
response head, the shutdown cut-off's 503, and the access entry. A 200 goes out
through the server's `respond` extension when it offers one (whole_response.py:
`bnfold serve`'s protocol does), in one call rather than ASGI's two messages. The
routes stay in the router for the OpenAPI document and for a server under a root path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from bnfold.service.access_log import AccessLog
from bnfold.service.request_log import CURRENT_REQUEST, request_context
from bnfold.service.rest.access import (
    REQUEST_ID_FIELD,
    ended_status,
    finish_request,
    header_value,
)
from bnfold.service.rest.errors import cut_off_response, handle_error
from bnfold.service.rest.responses import EncodedBodyResponse
from bnfold.service.rest.routes import infer_request
from bnfold.service.whole_response import RESPOND_EXTENSION

_MODELS = "/v2/models/"
_INFER = "/infer"
_NO_EXTENSIONS: dict[str, dict[str, Any]] = {}  # a scope without "extensions" (ASGI: optional)


def inference_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) when `path` is one of the two infer routes' paths, else None:
    the router's own matching (a path parameter is one non-empty segment)."""
    if not (path.startswith(_MODELS) and path.endswith(_INFER)):
        return None
    segments = path[len(_MODELS) : -len(_INFER)].split("/")
    if len(segments) == 1 and segments[0]:
        return segments[0], None
    if len(segments) == 3 and segments[1] == "versions" and segments[0] and segments[2]:
        return segments[0], segments[2]
    return None


class InferenceLane:
    """An ASGI app for one infer request whose target `inference_target` found."""

    def __init__(self, access_log: AccessLog | None) -> None:
        self.access_log = access_log

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, target: tuple[str, str | None]
    ) -> None:
        started = time.perf_counter_ns()
        context = request_context(header_value(scope, REQUEST_ID_FIELD))
        token = CURRENT_REQUEST.set(context)
        name, version = target
        scope["path_params"] = (
            {"model_name": name}
            if version is None
            else {"model_name": name, "model_version": version}
        )
        bytes_in = 0
        # the bytes read are counted for the access line only: none at --log-level warning
        access_log = self.access_log
        request_receive = receive
        if access_log is not None and access_log.writes_lines:

            async def counted_receive() -> Message:
                nonlocal bytes_in
                message = await receive()
                bytes_in += len(message.get("body", b""))
                return message

            request_receive = counted_receive
        request = Request(scope, request_receive, send)
        status = 0
        bytes_out = 0
        try:
            try:
                response = await infer_request(request, name, version)
            except Exception as exc:  # what `LastResort` did: the handler's answer, logged
                response = await handle_error(request, exc)
            except asyncio.CancelledError:  # the shutdown grace ended before an answer
                response = cut_off_response()
            request_id = (REQUEST_ID_FIELD, context.request_id.encode("ascii"))
            status = response.status_code
            offered = scope.get("extensions", _NO_EXTENSIONS).get(RESPOND_EXTENSION)
            if not (
                offered is not None
                and type(response) is EncodedBodyResponse
                and offered["respond"](status, [*response.fields, request_id], response.body)
            ):
                response.raw_headers.append(request_id)
                await response(scope, request_receive, send)
            bytes_out = len(response.body)
        except BaseException as exc:
            status = status or ended_status(exc)
            raise
        finally:
            finish_request(access_log, token, scope, context, status, bytes_in, bytes_out, started)
