"""`bnfold recalibrate`: re-estimate a package's BatchNorm statistics from unlabeled data.

Torch-free (onnx, onnxruntime, numpy): it works from the package alone, so the
serving install recalibrates too. Public API, stable for the service:

    recalibrate(RecalibrationRequest(...), step=...) -> RecalibrationResult

Modules: `data` (calibration data, checks, sha256), `source_package` (the
verified source package), `passes` (BN-dependency depths, pruned pass graphs),
`statistics` (the sequential and batch estimates, the chunking), `refold`
(the new package through the conversion skeleton), `pipeline` (the order),
`cli` (the command). Errors: `bnfold.convert.errors.RecalibrationError` and
its subclasses.
"""

from bnfold.convert.recalibration.pipeline import (
    STEPS,
    LayerDrift,
    RecalibrationRequest,
    RecalibrationResult,
    recalibrate,
)
from bnfold.convert.recalibration.statistics import DEFAULT_BATCH_SIZE, METHODS, Method

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "METHODS",
    "STEPS",
    "LayerDrift",
    "Method",
    "RecalibrationRequest",
    "RecalibrationResult",
    "recalibrate",
]
