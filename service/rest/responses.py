"""Responses as orjson bytes, and the route class that lets an endpoint return them directly."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from bnfold.service.codec import DecodedRequest, EncodedResponse, dumps, encode_response
from bnfold.service.dataplane import Prediction
from bnfold.service.protocol import INFERENCE_HEADER

JSON = "application/json"


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(content=dumps(payload), status_code=status_code, media_type=JSON)


def encode_prediction(prediction: Prediction, request: DecodedRequest) -> EncodedResponse:
    """The V2 response to `request`: each output JSON or binary, as the request asks."""
    model = prediction.model
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        header["id"] = request.id
    return encode_response(
        header,
        [
            (output_name, array, request.binary_for(output_name))
            for output_name, array in zip(prediction.output_names, prediction.arrays, strict=True)
        ],
    )


_JSON_TYPE = (b"content-type", JSON.encode())
_BINARY_TYPE = (b"content-type", b"application/octet-stream")
_HEADER_LENGTH = INFERENCE_HEADER.lower().encode("latin-1")


class EncodedBodyResponse(Response):
    """A 200 whose header fields are known in advance: starlette's `Response` with its
    header assembly (parsing a mapping, lower-casing, charset rules) left out, which
    every inference response paid for."""

    def __init__(self, body: bytes, fields: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.fields = fields  # besides Content-Length: what `whole_response.respond` takes
        self.raw_headers = [(b"content-length", b"%d" % len(body)), *fields]


def inference_response(encoded: EncodedResponse) -> Response:
    """JSON alone, or (binary outputs) the JSON header and the raw bytes with its length."""
    if encoded.header_length is None:
        return EncodedBodyResponse(encoded.body, [_JSON_TYPE])
    length = (_HEADER_LENGTH, b"%d" % encoded.header_length)
    return EncodedBodyResponse(encoded.body, [_BINARY_TYPE, length])


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
