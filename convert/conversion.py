"""The one conversion skeleton, whatever the source: torch module or ONNX file.

    adapter.fold(step)             analyse and fold in memory (trace, plan, rewrite)
    staged package (package.py)    a hidden directory in the repository
      adapter.export(directory)    model.onnx, train.onnx and calibration.onnx
      adapter.verify(directory)    all three against the source; VerificationFailed stops here
      tensor specs                 read from model.onnx (`tensor_specs`)
      manifest                     package_format.Manifest, validated as the service reads it
      atomic commit                hash, sync, rename into place
    -> ConversionResult

An adapter (`convert/torch/pipeline.py`, `convert/onnx/pipeline.py`) knows its
source; this module knows the order, the progress steps, the manifest and the
clean-up: any `ConvertError` leaves no package, and no repository directory
that the conversion itself created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import ValueInfoProto, helper

from bnfold.convert.errors import ConvertError, UnsupportedSource
from bnfold.convert.onnx.graph import op_counts
from bnfold.convert.package import staged_package
from bnfold.convert.report import BatchNormReport, ConversionResult, TensorSpec
from bnfold.package_format import DATATYPE_OF_DTYPE, EVAL_GRAPH, Source

#: Progress steps, in order; an adapter without a trace step skips "trace".
STEPS = ("load", "trace", "fold", "export", "verify", "write")
BATCHNORM = "BatchNormalization"

ProgressStep = Callable[[str], None]


def no_progress(_step: str) -> None:
    """The progress callback of a conversion nobody watches."""


@dataclass
class Folded:
    """What folding found: the BN report, the train graph's statistic outputs, and the op
    counts of the graph before folding when the source is a graph (ONNX)."""

    report: BatchNormReport
    train_outputs: list[str]
    op_counts_before: dict[str, int] | None = None


@dataclass
class Verified:
    """The manifest's verification block, and notes on what verification had to change."""

    block: dict[str, object]
    notes: list[str] = field(default_factory=list)


class ConversionAdapter(Protocol):
    """One kind of source. Methods run in this order, each at most once."""

    @property
    def source(self) -> Source: ...

    @property
    def default_name(self) -> str: ...

    def tool_versions(self) -> Mapping[str, str | int]: ...

    def fold(self, step: ProgressStep) -> Folded: ...

    def export(self, directory: Path) -> None:
        """Write model.onnx, train.onnx and calibration.onnx (and their external data) into
        `directory` (the package format's EVAL_GRAPH, TRAIN_GRAPH and CALIBRATION_GRAPH)."""

    def verify(self, directory: Path) -> Verified:
        """Check the three written graphs against the source (the block's `eval`, `train` and
        `calibration` entries); raise VerificationFailed if any differs."""


def convert(
    adapter: ConversionAdapter,
    repository: Path,
    *,
    name: str | None = None,
    version: int | None = None,
    step: ProgressStep = no_progress,
    manifest_fields: Mapping[str, object] | None = None,
) -> ConversionResult:
    """Run `adapter` through the skeleton; raises ConvertError subclasses on any failure.
    `manifest_fields` adds manifest fields (`recalibrations`) to those the skeleton writes."""
    folded = adapter.fold(step)
    name = name or adapter.default_name
    repository_existed = repository.exists()
    try:
        with staged_package(repository, name, version) as staged:
            step("export")
            adapter.export(staged.directory)
            step("verify")
            verified = adapter.verify(staged.directory)
            step("write")
            model_path = staged.directory / EVAL_GRAPH
            inputs, outputs = tensor_specs(model_path)
            after = op_counts(onnx.load(str(model_path), load_external_data=False).graph)
            counts = node_counts(folded, after)
            fields: dict[str, object] = {
                "source": adapter.source,
                "tool_versions": {"bnfold": package_version("bnfold"), **adapter.tool_versions()},
                "inputs": [spec.__dict__ for spec in inputs],
                "outputs": [spec.__dict__ for spec in outputs],
                "batchnorm": folded.report.as_dict(),
                "train_outputs": folded.train_outputs,
                "verification": verified.block,
                "node_counts": counts,
            }
            if folded.op_counts_before is not None:
                fields["op_counts"] = {"before": folded.op_counts_before, "after": after}
            if verified.notes:
                fields["notes"] = verified.notes
            fields.update(manifest_fields or {})
            final_path = staged.commit(fields)
    except ConvertError:
        if not repository_existed:
            with contextlib.suppress(OSError):
                repository.rmdir()
        raise
    return ConversionResult(
        name=name,
        version=staged.version,
        package_path=str(final_path),
        source_kind=adapter.source.kind,
        inputs=inputs,
        outputs=outputs,
        batchnorm=folded.report,
        verification=verified.block,
        node_counts=counts,
    )


def node_counts(folded: Folded, after: Mapping[str, int]) -> dict[str, int]:
    """The manifest's summary. Without a source graph (torch), the graph before folding is
    model.onnx plus one BatchNormalization per folded BN: what an export without folding
    holds."""
    before = folded.op_counts_before
    nodes_after = sum(after.values())
    return {
        "batchnorm_before": folded.report.total if before is None else before.get(BATCHNORM, 0),
        "batchnorm_after": after.get(BATCHNORM, 0),
        "nodes_before": nodes_after + len(folded.report.folded)
        if before is None
        else sum(before.values()),
        "nodes_after": nodes_after,
    }


def tensor_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest's inputs and outputs: V2 datatypes, -1 for every non-fixed axis.

    Inputs are the graph inputs a request must supply: an initializer listed as
    an input (an overridable default) keeps its default and is left out.
    """
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}

    def spec(value: ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            datatype = DATATYPE_OF_DTYPE[dtype]
        except (KeyError, TypeError) as error:
            raise UnsupportedSource(
                f"{value.name} has element type {tensor_type.elem_type}, which has no KServe V2 "
                "datatype bnfold serves"
            ) from error
        shape = [
            dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim
        ]
        return TensorSpec(value.name, datatype, shape)

    inputs = [spec(value) for value in graph.input if value.name not in initializers]
    return inputs, [spec(value) for value in graph.output]
