"""Converter errors: each class carries the CLI exit code it maps to.

The CLI turns any `ConvertError` into a one-line message and its exit code
(2 for bad input, 1 for a failed verification); nothing else in the converter
decides exit codes.
"""

from __future__ import annotations


def first_line(error: BaseException, *, root_cause: bool = False) -> str:
    """The first line of `error`'s message (its type when empty), for one-line CLI errors.

    `root_cause` follows `__cause__` to the bottom first: wrappers such as torch.fx's
    ShapeProp embed whole tracebacks in their own message.
    """
    while root_cause and error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ConvertError(Exception):
    """Base class: a conversion that cannot go on, with a message for the user."""

    exit_code = 2


class SourceError(ConvertError):
    """The source cannot be read: missing or unreadable file, unknown built-in, bad factory."""


class InputShapeError(ConvertError):
    """The input shape is missing, malformed, or does not fit the model."""


class UntraceableModel(ConvertError):
    """torch.fx cannot trace the model; the message names the construct."""


class UnsupportedSource(ConvertError):
    """A source kind or ONNX construct bnfold does not handle."""


class PackageError(ConvertError):
    """The package cannot be written where asked (bad name, version already present)."""


class VerificationFailed(ConvertError):
    """The converted graphs disagree with the original beyond tolerance; nothing was written."""

    exit_code = 1


class RecalibrationError(ConvertError):
    """Base of `bnfold recalibrate`'s errors: nothing was written. Exit code 2."""


class CalibrationDataError(RecalibrationError):
    """The calibration data or an option cannot be used: unreadable file, wrong datatype or
    shape, NaN/Inf, too few samples for a variance (the service answers 422)."""


class PackageNotFound(RecalibrationError):
    """No such model, or no such version of it, in the repository (the service answers 404)."""


class NotRecalibratable(RecalibrationError):
    """The package cannot be recalibrated: no BatchNorm layers, written before calibration.onnx
    (schema 1), or its files fail their sha256 (the service answers 409)."""
