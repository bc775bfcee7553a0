"""Errors -> gRPC status codes, in one place (`grpc_code` on each class of service/errors.py):
every class has a real code, no client mistake is INTERNAL or UNKNOWN, and retry advice
travels as trailing metadata."""

from __future__ import annotations

import grpc
import pytest

from bnfold.service import errors
from bnfold.service.grpc.status import status_code, trailing_metadata


def all_error_classes() -> list[type[errors.BnfoldServiceError]]:
    found, pending = [], [errors.BnfoldServiceError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_class_names_a_grpc_status_code() -> None:
    classes = all_error_classes()
    assert len(classes) >= 14
    for cls in classes:
        assert isinstance(status_code(cls("x")), grpc.StatusCode), cls


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda cls: cls.__name__)
def test_only_server_faults_are_internal(cls: type[errors.BnfoldServiceError]) -> None:
    code = status_code(cls("x"))
    assert code is not grpc.StatusCode.UNKNOWN
    if cls.status_code < 500:
        assert code is not grpc.StatusCode.INTERNAL, cls
    if cls.status_code == 503:
        assert code is grpc.StatusCode.UNAVAILABLE, cls


def test_the_codes_clients_branch_on() -> None:
    expected = {
        errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
        errors.Unprocessable: grpc.StatusCode.INVALID_ARGUMENT,
        errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
        errors.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
        errors.PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.QueueFull: grpc.StatusCode.UNAVAILABLE,
        errors.BnfoldServiceError: grpc.StatusCode.INTERNAL,
    }
    for cls, code in expected.items():
        assert status_code(cls("x")) is code, cls


def test_retry_advice_is_trailing_metadata() -> None:
    seconds = errors.QueueFull.RETRY_AFTER_SECONDS
    assert trailing_metadata(errors.QueueFull("full")) == (
        ("grpc-retry-pushback-ms", str(seconds * 1000)),
        ("retry-after", str(seconds)),
    )
    assert trailing_metadata(errors.DecodeBudgetFull("full"))[0][0] == "grpc-retry-pushback-ms"
    assert trailing_metadata(errors.Unavailable("not ready")) == ()
    assert trailing_metadata(errors.Unauthorized("who?")) == ()  # WWW-Authenticate is HTTP's
