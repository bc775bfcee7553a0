"""Numerical agreement between a converted graph and its original.

Pure numpy so the torch path and the ONNX path judge with the same rule:
|actual − expected| ≤ atol·scale + rtol·|expected| elementwise, float32
tolerances (atol 1e-5, rtol 1e-4), where scale = max(1, RMS of the expected
tensor). For outputs of order one that is exactly the float32 rule; for an
output a large γ scales to ~100, a value that lands near zero carries the
absolute float32 rounding of its neighbours, and judging it against 1e-5
would fail torch's own float32 evaluation too. A wrong fold is off by the
output's scale, far beyond either bound. The relative error reported is the
largest |actual − expected| / max(|expected|, atol).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold.convert.errors import InputShapeError, VerificationFailed

#: Seeds of the random verification batches (the batch at position i uses VERIFY_SEED + i).
VERIFY_SEED = 20261123
#: Verification batch sizes: small inputs get larger batches, inputs of more than
#: `LARGE_ROW_VALUES` values per row smaller ones, so verifying costs seconds, not
#: minutes. Batches of more than one row also verify train.onnx.
SMALL_INPUT_BATCH_SIZES = (1, 4, 16)
LARGE_INPUT_BATCH_SIZES = (1, 2, 4)
LARGE_ROW_VALUES = 16_384


def verification_batch_sizes(row_values: int) -> tuple[int, ...]:
    """The batch sizes to verify on, for inputs of `row_values` values per row (all inputs)."""
    return SMALL_INPUT_BATCH_SIZES if row_values <= LARGE_ROW_VALUES else LARGE_INPUT_BATCH_SIZES


#: The most values one verification batch may hold (2**28: 1 GiB of float32). A
#: typo in an input shape is refused with this bound, not attempted as a
#: terabyte allocation.
MAX_BATCH_VALUES = 2**28


def check_batch_size(shape: Sequence[int], dtype: np.dtype, what: str) -> None:
    """InputShapeError when a batch of `shape` would hold more than `MAX_BATCH_VALUES` values."""
    values = math.prod(shape)
    if values > MAX_BATCH_VALUES:
        needed = _byte_size(values * dtype.itemsize)
        limit = _byte_size(MAX_BATCH_VALUES * 4)
        raise InputShapeError(
            f"{what} is too large to verify: a batch of shape {tuple(shape)} holds {values:,} "
            f"values ({needed} of {dtype}); bnfold verifies on batches of at most "
            f"{MAX_BATCH_VALUES:,} values (2**28, {limit} of float32)"
        )


def _byte_size(size: int) -> str:
    value, unit = float(size), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.3g} {unit}"


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-5
    rtol: float = 1e-4


FLOAT32_TOLERANCE = Tolerance()


@dataclass
class Agreement:
    """Running maxima over every compared batch; `samples` counts batch rows."""

    tolerance: Tolerance = FLOAT32_TOLERANCE
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    samples: int = 0
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def add(self, label: str, actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
        """Compare one batch's outputs (same order, same shapes)."""
        if len(actual) != len(expected):
            self._fail(f"{label}: {len(actual)} outputs, expected {len(expected)}")
            return
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            got64 = np.asarray(got, dtype=np.float64)
            want64 = np.asarray(want, dtype=np.float64)
            if got64.shape != want64.shape:
                self._fail(f"{label} output {index}: shape {got64.shape}, expected {want64.shape}")
                continue
            if got64.size == 0:
                continue
            error = np.abs(got64 - want64)
            nonfinite = ~np.isfinite(error)
            # NaN in the same places on both sides is agreement, not an error.
            same_nonfinite = nonfinite & ((np.isnan(got64) & np.isnan(want64)) | (got64 == want64))
            if np.any(nonfinite & ~same_nonfinite):
                self._fail(f"{label} output {index}: non-finite values disagree")
                continue
            error = np.where(same_nonfinite, 0.0, error)
            magnitude = np.where(same_nonfinite, 0.0, np.abs(want64))
            self.max_abs_err = max(self.max_abs_err, float(error.max()))
            relative = error / np.maximum(magnitude, self.tolerance.atol)
            self.max_rel_err = max(self.max_rel_err, float(relative.max()))
            finite_expected = want64[np.isfinite(want64)]
            scale = (
                max(1.0, float(np.sqrt(np.mean(finite_expected**2))))
                if finite_expected.size
                else 1.0
            )
            limit = self.tolerance.atol * scale + self.tolerance.rtol * magnitude
            excess = error > limit
            if np.any(excess):
                worst = int(np.argmax(error - limit))
                self._fail(
                    f"{label} output {index}: {int(excess.sum())} of {error.size} values out of "
                    f"tolerance, worst |Δ|={error.flat[worst]:.3g} at |expected|="
                    f"{magnitude.flat[worst]:.3g}"
                )
        first = np.asarray(expected[0]) if expected else np.zeros(())
        self.samples += int(first.shape[0]) if first.ndim else 1

    def _fail(self, message: str) -> None:
        self.passed = False
        self.failures.append(message)

    def as_dict(self) -> dict[str, object]:
        return {
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "samples": self.samples,
            "passed": self.passed,
        }


def verification_block(
    eval_agreement: Agreement, train_agreement: Agreement, calibration_agreement: Agreement
) -> dict[str, object]:
    """The manifest's verification block, the same for both conversion paths.

    Raises VerificationFailed (nothing is written then) when any graph
    disagrees with its reference.
    """
    graphs = {
        "eval": eval_agreement,
        "train": train_agreement,
        "calibration": calibration_agreement,
    }
    failures = [failure for agreement in graphs.values() for failure in agreement.failures]
    if failures:
        raise VerificationFailed(
            "verification failed, nothing written:\n  " + "\n  ".join(failures)
        )
    return {
        **{graph: agreement.as_dict() for graph, agreement in graphs.items()},
        "max_abs_err": max(agreement.max_abs_err for agreement in graphs.values()),
        "max_rel_err": max(agreement.max_rel_err for agreement in graphs.values()),
        "samples": sum(agreement.samples for agreement in graphs.values()),
        "passed": True,
        "tolerance": {"atol": eval_agreement.tolerance.atol, "rtol": eval_agreement.tolerance.rtol},
    }
