"""The recalibrated package: the unfolded graph with the new statistics, folded again.

calibration.onnx holds the unfolded eval graph; `unfolded_source` turns it back
into a plain ONNX model whose BatchNorms carry the new running statistics (BN
node names = layer names). That model goes through the same conversion
skeleton as any .onnx source (`convert.conversion.convert` with the ONNX
adapter): fold, write model.onnx, train.onnx and calibration.onnx, verify the
folded model against the unfolded graph with the new statistics (the
calibration data's first samples among the verification batches), and commit
atomically. Only the manifest's provenance differs from a plain conversion:
the original package's `source`, and `recalibrations` extended by this step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from onnx import ModelProto

from bnfold.convert.conversion import ProgressStep, convert
from bnfold.convert.errors import NotRecalibratable
from bnfold.convert.onnx.calibration_graph import unfolded_source
from bnfold.convert.onnx.io import OnnxSource, fits_in_one_proto, load_onnx_source, save_model
from bnfold.convert.onnx.pipeline import OnnxAdapter
from bnfold.convert.onnx.verify import fixed_batch, input_specs
from bnfold.convert.report import ConversionResult
from bnfold.package_format import Recalibration, Source

#: Rows of calibration data added to the verification batches.
VERIFY_SAMPLES = 16


class RecalibratedAdapter(OnnxAdapter):
    """The ONNX adapter on the unfolded graph, reporting the original package's source."""

    def __init__(
        self,
        loaded: OnnxSource,
        sample: np.ndarray | None,
        input_shape: Sequence[int] | None,
        source: Source,
    ) -> None:
        super().__init__(loaded, sample, input_shape)
        self.original_source = source

    @property
    def source(self) -> Source:
        return self.original_source


def write_recalibrated(
    calibration: ModelProto,
    statistics: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    repository: Path,
    name: str,
    version: int | None,
    source: Source,
    recalibrations: Sequence[Recalibration],
    data: Mapping[str, np.ndarray],
    scratch: Path,
    step: ProgressStep,
) -> ConversionResult:
    """Fold, verify and commit REPO/NAME/VERSION (the next version when None).

    `statistics[layer]` = (running_mean, running_var); `data` is the calibration
    data (by input name), whose first rows join verification for a one-input
    model. Raises ConvertError subclasses (VerificationFailed: exit 1).
    """
    try:
        model = unfolded_source(calibration, statistics)
    except ValueError as error:
        raise NotRecalibratable(f"cannot rebuild the unfolded graph: {error}") from None
    path = scratch / "unfolded" / f"{name}.onnx"
    path.parent.mkdir()
    save_model(model, path, external=not fits_in_one_proto(model))
    del model
    loaded = load_onnx_source(path)
    rows = fixed_batch(input_specs(loaded.model)) or VERIFY_SAMPLES
    sample, input_shape = _verification_sample(data, rows)
    adapter = RecalibratedAdapter(loaded, sample, input_shape, source)
    return convert(
        adapter,
        repository,
        name=name,
        version=version,
        step=step,
        manifest_fields={"recalibrations": list(recalibrations)},
    )


def _verification_sample(
    data: Mapping[str, np.ndarray], rows: int
) -> tuple[np.ndarray | None, tuple[int, ...] | None]:
    """For a one-input model: the first `rows` of the data, and its shape to size symbolic
    axes (the ONNX adapter takes one sample array, so a multi-input model verifies on random
    batches alone)."""
    if len(data) != 1:
        return None, None
    array = next(iter(data.values()))
    sample = array[:rows]
    return sample, tuple(sample.shape)
