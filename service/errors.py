"""The service's errors: one hierarchy, each class carrying its HTTP status and gRPC code.

Code raises the most specific error where it finds the problem; the REST
layer's one exception handler (`rest.errors`) turns any of them into the V2
error body `{"error": "..."}`, the gRPC layer (`grpc.status`) into an aborted
call with `grpc_code`. Only a bug is a 500 / INTERNAL: a client's mistake never
is. No web framework here, nor grpcio: the data plane, the registry and the
codec raise these without importing either; a code is the name of its
`grpc.StatusCode` member.
"""

from __future__ import annotations

from typing import ClassVar, Literal

# The `grpc.StatusCode` names the hierarchy uses (grpc.status turns one into the member).
GrpcCode = Literal[
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "UNIMPLEMENTED",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
]


class BnfoldServiceError(Exception):
    """Base of every error the service reports to a client."""

    status_code: ClassVar[int] = 500
    grpc_code: ClassVar[GrpcCode] = "INTERNAL"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadRequest(BnfoldServiceError):
    """Malformed JSON, tensor or parameter: the request cannot be read."""

    status_code = 400
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(BnfoldServiceError):
    """Missing or wrong admin bearer token."""

    status_code = 401
    grpc_code = "UNAUTHENTICATED"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", **(headers or {})})


class Forbidden(BnfoldServiceError):
    """The endpoint is switched off (admin endpoints without BNFOLD_ADMIN_TOKEN)."""

    status_code = 403
    grpc_code = "PERMISSION_DENIED"


class NotFound(BnfoldServiceError):
    """Unknown model, version or route."""

    status_code = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowed(BnfoldServiceError):
    status_code = 405
    grpc_code = "UNIMPLEMENTED"


class Conflict(BnfoldServiceError):
    """The request clashes with the state of the model: a recalibration of it is already
    running, the package cannot be recalibrated, the repository cannot take a new version."""

    status_code = 409
    # the request is fine, the model's state is not (gRPC's guide: retry after fixing the state)
    grpc_code = "FAILED_PRECONDITION"


class PayloadTooLarge(BnfoldServiceError):
    """Request body (or its decompressed form) over `max_body_bytes`, or a body whose
    estimated decoding cost alone exceeds the decode budget (`max_decode_bytes`)."""

    status_code = 413
    # gRPC's own code for a message over max_receive_message_length
    grpc_code = "RESOURCE_EXHAUSTED"


class UnsupportedMediaType(BnfoldServiceError):
    """A Content-Encoding the service cannot decode."""

    status_code = 415
    grpc_code = "INVALID_ARGUMENT"


class Unprocessable(BnfoldServiceError):
    """Well-formed, but does not fit the model: names, shapes, datatypes, batch statistics."""

    status_code = 422
    grpc_code = "INVALID_ARGUMENT"


class Unavailable(BnfoldServiceError):
    """Known but not ready: a broken or unloaded package, a server shutting down."""

    status_code = 503
    # with retry pushback when the error carries Retry-After (grpc.status)
    grpc_code = "UNAVAILABLE"


class QueueFull(Unavailable):
    """A model's request queue is at `max_queue_size`: refused at once, the client retries later."""

    RETRY_AFTER_SECONDS: ClassVar[int] = 1

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        retry = {"Retry-After": str(self.RETRY_AFTER_SECONDS)}
        super().__init__(message, headers={**retry, **(headers or {})})


class DecodeBudgetFull(QueueFull):
    """The requests in flight hold the decode budget (`max_decode_bytes`): refused at once,
    the client retries later."""


class PackageError(Unavailable):
    """A package that cannot be served; the message is the reason shown in the index."""


class DeviceUnavailable(Unavailable):
    """`--device cuda` without onnxruntime-gpu or a usable GPU (a start-up error)."""


def as_service_error(exc: Exception) -> BnfoldServiceError:
    """`exc` if it is one of ours; anything else is a bug, reported as a bare 500.

    The REST layer translates the web framework's own exceptions before it
    falls back to this (`rest.errors`); here no framework is known.
    """
    if isinstance(exc, BnfoldServiceError):
        return exc
    return BnfoldServiceError("internal server error")
