"""The ONNX conversion end to end, and `bnfold inspect`.

source.onnx → validate + shape inference (onnx_io) → fold passes on a copy
(onnx_fold) → train graph from another copy (onnx_train_graph) → free a pinned
batch axis → write model.onnx and train.onnx into a staging directory →
verify both (onnx_verify) → manifest → atomic rename (package).

Nothing here imports torch. A failed verification raises VerificationFailed
before the commit, so the staging directory goes and no package appears.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import ModelProto, ValueInfoProto, helper

from bnfold.convert.errors import (
    ConvertError,
    SourceError,
    UnsupportedSource,
)
from bnfold.convert.onnx.fold import fold_batchnorms
from bnfold.convert.onnx.graph import free_batch_axis, op_counts
from bnfold.convert.onnx.io import OnnxSource, load_onnx_source, needs_external_data, save_model
from bnfold.convert.onnx.reference import TrainReference
from bnfold.convert.onnx.train_graph import build_train_graph
from bnfold.convert.onnx.verify import (
    Feed,
    InputSpec,
    fixed_batch,
    input_specs,
    pin_input_shape,
    session,
    verification_feeds,
    verify_batch_growth,
    verify_eval,
    verify_train,
)
from bnfold.convert.package import MANIFEST, staged_package
from bnfold.convert.report import (
    V2_DATATYPES,
    BatchNormLayer,
    BatchNormReport,
    ConversionResult,
    FoldedBatchNorm,
    KeptBatchNorm,
    TensorSpec,
)
from bnfold.convert.verify import verification_block

MODEL_FILE = "model.onnx"
TRAIN_FILE = "train.onnx"
BATCHNORM = "BatchNormalization"

Step = Callable[[str], None]


def convert_onnx_file(
    source: Path,
    *,
    repository: Path,
    name: str | None,
    version: int | None,
    sample: np.ndarray | None,
    input_shape: Sequence[int] | None = None,
    progress: bool = False,
) -> ConversionResult:
    """Fold, verify and package an ONNX file; raises ConvertError subclasses on any failure.

    `input_shape` sets the symbolic axes of the verification batches (`pin_input_shape`).
    """
    with _progress(progress) as step:
        step("load")
        loaded = load_onnx_source(source)
        return _convert(loaded, repository, name or source.stem, version, sample, input_shape, step)


def _convert(
    loaded: OnnxSource,
    repository: Path,
    name: str,
    version: int | None,
    sample: np.ndarray | None,
    input_shape: Sequence[int] | None,
    step: Step,
) -> ConversionResult:
    specs = input_specs(loaded.model)
    if input_shape is not None:
        specs = pin_input_shape(specs, input_shape)
    feeds = verification_feeds(specs, sample)
    step("fold")
    folded = _copy(loaded.model)
    report = fold_batchnorms(folded, loaded.tensor_info)
    train = _copy(loaded.model)
    stat_names = build_train_graph(train, loaded.tensor_info)
    counts = {"before": op_counts(loaded.model.graph), "after": op_counts(folded.graph)}
    external = needs_external_data(folded, source_external=loaded.external_data)
    repository_existed = repository.exists()
    try:
        with staged_package(repository, name, version) as staged:
            step("export")
            graphs = _write_graphs(staged.directory, folded, train, specs, external=external)
            del folded, train
            step("verify")
            verification, notes = _verify(loaded, graphs, specs, feeds)
            step("write")
            inputs, outputs = tensor_specs(graphs.model_path)
            node_counts = _node_counts(counts)
            manifest: dict[str, object] = {
                "source": {"kind": "onnx", "ref": str(loaded.path), "sha256": loaded.sha256},
                "tool_versions": {
                    "bnfold": package_version("bnfold"),
                    "onnx": onnx.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "opset": loaded.opset,
                },
                "inputs": [asdict(spec) for spec in inputs],
                "outputs": [asdict(spec) for spec in outputs],
                "batchnorm": report.as_dict(),
                "train_outputs": stat_names,
                "verification": verification,
                "node_counts": node_counts,
                "op_counts": counts,
            }
            if notes:
                manifest["notes"] = notes
            final_path = staged.commit(manifest)
    except ConvertError:
        if not repository_existed:
            with contextlib.suppress(OSError):
                repository.rmdir()
        raise
    return ConversionResult(
        name=name,
        version=staged.version,
        package_path=str(final_path),
        source_kind="onnx",
        inputs=inputs,
        outputs=outputs,
        batchnorm=report,
        verification=verification,
        node_counts=node_counts,
    )


def _copy(model: ModelProto) -> ModelProto:
    duplicate = ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


#: A graph's inputs, outputs and value_info, copied before the batch axis is freed.
_IoSnapshot = list[list[ValueInfoProto]]


@dataclass
class _WrittenGraphs:
    """model.onnx and train.onnx on disk; `freed_batch` is the pinned size made symbolic."""

    model_path: Path
    train_path: Path
    freed_batch: int | None
    pinned_io: dict[Path, _IoSnapshot]

    def pin_batch_again(self) -> None:
        """Put the pinned input/output shapes back; external weights stay where they are."""
        for path, snapshot in self.pinned_io.items():
            model = onnx.load(str(path), load_external_data=False)
            graph = model.graph
            for values, saved in zip(
                (graph.input, graph.output, graph.value_info), snapshot, strict=True
            ):
                del values[:]
                values.extend(saved)
            onnx.save_model(model, str(path))
            onnx.checker.check_model(str(path))
        self.freed_batch = None


def _write_graphs(
    directory: Path,
    folded: ModelProto,
    train: ModelProto,
    specs: Sequence[InputSpec],
    *,
    external: bool,
) -> _WrittenGraphs:
    """Free a pinned batch axis in both graphs, then save them (consumes their weights)."""
    graphs = _WrittenGraphs(directory / MODEL_FILE, directory / TRAIN_FILE, None, {})
    pinned = fixed_batch(specs)
    if pinned is not None:
        graphs.pinned_io = {
            graphs.model_path: _io_snapshot(folded),
            graphs.train_path: _io_snapshot(train),
        }
        if free_batch_axis(folded, pinned):
            free_batch_axis(train, pinned)
            graphs.freed_batch = pinned
    save_model(folded, graphs.model_path, external=external)
    save_model(train, graphs.train_path, external=external)
    return graphs


def _io_snapshot(model: ModelProto) -> _IoSnapshot:
    graph = model.graph
    return [
        [_copy_value(value) for value in values]
        for values in (graph.input, graph.output, graph.value_info)
    ]


def _copy_value(value: ValueInfoProto) -> ValueInfoProto:
    duplicate = ValueInfoProto()
    duplicate.CopyFrom(value)
    return duplicate


def _verify(
    loaded: OnnxSource,
    graphs: _WrittenGraphs,
    specs: Sequence[InputSpec],
    feeds: Sequence[Feed],
) -> tuple[dict[str, object], list[str]]:
    """The manifest's verification block and notes; VerificationFailed if it did not pass."""
    reference = session(loaded.path, optimized=False)
    notes: list[str] = []
    pinned = graphs.freed_batch
    if pinned is not None:
        paths = [graphs.model_path, graphs.train_path]
        problem = verify_batch_growth(reference, paths, specs, pinned)
        if problem:
            graphs.pin_batch_again()
            notes.append(f"the batch axis stays fixed at {pinned}: {problem}")
    eval_agreement = verify_eval(reference, graphs.model_path, feeds)
    with TrainReference(loaded.model, loaded.tensor_info) as train_reference:
        train_agreement = verify_train(train_reference, graphs.train_path, feeds)
    verification = verification_block(eval_agreement, train_agreement)
    return verification, notes


def _node_counts(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """The flat summary both conversion paths report (see the torch pipeline)."""
    return {
        "batchnorm_before": counts["before"].get(BATCHNORM, 0),
        "batchnorm_after": counts["after"].get(BATCHNORM, 0),
        "nodes_before": sum(counts["before"].values()),
        "nodes_after": sum(counts["after"].values()),
    }


def tensor_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest's inputs and outputs: V2 datatypes, -1 for every non-fixed axis."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}

    def spec(value: ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            datatype = V2_DATATYPES[dtype]
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


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Step]:
    if not enabled:
        yield lambda _label: None
        return
    from bnfold.convert.cli import conversion_progress

    with conversion_progress(True) as advance:
        yield advance


# -- inspect ---------------------------------------------------------------------------------


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
    folded = _copy(loaded.model)
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
    manifest_path, model_path = directory / MANIFEST, directory / MODEL_FILE
    if not manifest_path.is_file() or not model_path.is_file():
        raise SourceError(
            f"{directory} is not a package: it needs {MANIFEST} and {MODEL_FILE} "
            "(give REPO/NAME/VERSION, or an .onnx file)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        batchnorm = manifest["batchnorm"]
        report = BatchNormReport(
            folded=[FoldedBatchNorm(**item) for item in batchnorm["folded"]],
            kept=[KeptBatchNorm(**item) for item in batchnorm["kept"]],
            layers=[BatchNormLayer(**item) for item in batchnorm.get("layers", [])],
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SourceError(f"cannot read the BN report in {manifest_path}: {error}") from error
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as error:
        raise SourceError(f"cannot read {model_path}: {error}") from error
    before = manifest.get("op_counts", {}).get("before")
    return InspectReport(
        path=str(directory),
        kind="package",
        opset=manifest.get("tool_versions", {}).get("opset"),
        batchnorm=report,
        node_counts_before=before,
        node_counts_after=op_counts(model.graph),
    )
