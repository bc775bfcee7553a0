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

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name lives; imported on first use (PEP 562), because the pipeline
#: brings onnx, and `bnfold serve` (whose CLI registers `bnfold recalibrate` beside it)
#: should not carry 7 MB of a library it only needs when a recalibration runs.
_HOMES = {
    "STEPS": "pipeline",
    "LayerDrift": "pipeline",
    "RecalibrationRequest": "pipeline",
    "RecalibrationResult": "pipeline",
    "recalibrate": "pipeline",
    "DEFAULT_BATCH_SIZE": "statistics",
    "METHODS": "statistics",
    "Method": "statistics",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


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
