"""`bnfold inspect`: the BatchNorm report of an .onnx file or a package, nothing written.

For an .onnx file the folds are computed in memory on a copy; for a package
they come from its manifest (read through the package format), with the node
counts after folding from its model.onnx. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import ModelProto

from bnfold.convert.errors import SourceError
from bnfold.convert.onnx.fold import fold_batchnorms
from bnfold.convert.onnx.graph import op_counts
from bnfold.convert.onnx.io import load_onnx_source
from bnfold.convert.report import (
    BatchNormLayer,
    BatchNormReport,
    FoldedBatchNorm,
    KeptBatchNorm,
)
from bnfold.package_format import (
    EVAL_GRAPH,
    MANIFEST,
    ManifestError,
    ManifestLayer,
    parse_manifest,
)


@dataclass
class InspectReport:
    """What `bnfold inspect` prints: the BN report and node counts, nothing written.

    For an .onnx file the folds are computed in memory; for a package they come
    from its manifest, with the after-counts from its model.onnx (before-counts
    only when the manifest recorded them: ONNX-path packages do).
    """

    path: str
    kind: str  # "onnx" (a source file) or "package"
    opset: int | None
    batchnorm: BatchNormReport
    node_counts_before: dict[str, int] | None
    node_counts_after: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "kind": self.kind,
            "opset": self.opset,
            "batchnorm": self.batchnorm.as_dict(),
            "node_counts": {"before": self.node_counts_before, "after": self.node_counts_after},
        }


def inspect_path(path: Path) -> InspectReport:
    """Report on an .onnx file (folding a copy in memory) or a package directory."""
    if path.is_dir():
        return _inspect_package(path)
    loaded = load_onnx_source(path)
    folded = ModelProto()
    folded.CopyFrom(loaded.model)
    report = fold_batchnorms(folded, loaded.tensor_info)
    return InspectReport(
        path=str(path),
        kind="onnx",
        opset=loaded.opset,
        batchnorm=report,
        node_counts_before=op_counts(loaded.model.graph),
        node_counts_after=op_counts(folded.graph),
    )


def _inspect_package(directory: Path) -> InspectReport:
    manifest_path, model_path = directory / MANIFEST, directory / EVAL_GRAPH
    if not manifest_path.is_file() or not model_path.is_file():
        raise SourceError(
            f"{directory} is not a package: it needs {MANIFEST} and {EVAL_GRAPH} "
            "(give REPO/NAME/VERSION, or an .onnx file)"
        )
    try:
        manifest = parse_manifest(manifest_path.read_bytes())
    except (OSError, ManifestError) as error:
        raise SourceError(f"cannot read the BN report in {manifest_path}: {error}") from error
    batchnorm = manifest.batchnorm
    report = BatchNormReport(
        folded=[FoldedBatchNorm(item.name, item.into, item.direction) for item in batchnorm.folded],
        kept=[KeptBatchNorm(item.name, item.reason) for item in batchnorm.kept],
        layers=[_report_layer(layer) for layer in batchnorm.layers],
        by_pattern=dict(getattr(batchnorm, "by_pattern", None) or {}),
    )
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as error:
        raise SourceError(f"cannot read {model_path}: {error}") from error
    op_counts_recorded = getattr(manifest, "op_counts", None) or {}
    opset = manifest.tool_versions.get("opset")
    return InspectReport(
        path=str(directory),
        kind="package",
        opset=opset if isinstance(opset, int) else None,
        batchnorm=report,
        node_counts_before=op_counts_recorded.get("before"),
        node_counts_after=op_counts(model.graph),
    )


def _report_layer(layer: ManifestLayer) -> BatchNormLayer:
    return BatchNormLayer(
        name=layer.name,
        channels=layer.channels,
        eps=layer.eps,
        running_mean=list(layer.running_mean),
        running_var=list(layer.running_var),
        input_rank=layer.input_rank or 0,
        batch_mean_output=layer.batch_mean_output,
        batch_var_output=layer.batch_var_output,
        channel_axis=layer.channel_axis,
    )
