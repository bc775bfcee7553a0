"""The ONNX adapter of the conversion skeleton (`convert.conversion`).

fold: validate + shape inference (onnx.io) -> fold passes on a copy
(onnx.fold) -> train graph from another copy (onnx.train_graph) -> calibration
graph from a third (onnx.calibration_graph). export: free a pinned batch axis,
write model.onnx, train.onnx and calibration.onnx (external data when the
source had it or the graph is too big for one protobuf). verify: all three
against the original (onnx.verify).

Nothing here imports torch: on the serving install (no torch) `bnfold convert
x.onnx` works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import ModelProto, ValueInfoProto

from bnfold.convert.conversion import Folded, ProgressStep, Verified, convert, no_progress
from bnfold.convert.onnx.calibration_graph import build_calibration_graph, source_layers
from bnfold.convert.onnx.fold import fold_batchnorms
from bnfold.convert.onnx.graph import free_batch_axis, op_counts
from bnfold.convert.onnx.io import OnnxSource, load_onnx_source, needs_external_data, save_model
from bnfold.convert.onnx.reference import InputStatisticsReference, TrainReference
from bnfold.convert.onnx.train_graph import build_train_graph
from bnfold.convert.onnx.verify import (
    InputSpec,
    fixed_batch,
    input_specs,
    pin_input_shape,
    session,
    verification_feeds,
    verify_batch_growth,
    verify_calibration,
    verify_eval,
    verify_train,
)
from bnfold.convert.report import ConversionResult
from bnfold.convert.verify import verification_block
from bnfold.package_format import CALIBRATION_GRAPH, EVAL_GRAPH, TRAIN_GRAPH, Source


def convert_onnx_file(
    source: Path,
    *,
    repository: Path,
    name: str | None,
    version: int | None,
    sample: np.ndarray | None,
    input_shape: Sequence[int] | None = None,
    step: ProgressStep = no_progress,
) -> ConversionResult:
    """Fold, verify and package an ONNX file; raises ConvertError subclasses on any failure.

    `input_shape` sets the symbolic axes of the verification batches (`pin_input_shape`).
    """
    step("load")
    adapter = OnnxAdapter(load_onnx_source(source), sample, input_shape)
    return convert(adapter, repository, name=name, version=version, step=step)


class OnnxAdapter:
    """A loaded ONNX source through fold, export and verify (`ConversionAdapter`)."""

    def __init__(
        self,
        loaded: OnnxSource,
        sample: np.ndarray | None,
        input_shape: Sequence[int] | None,
    ) -> None:
        self.loaded = loaded
        specs = input_specs(loaded.model)
        if input_shape is not None:
            specs = pin_input_shape(specs, input_shape)
        self.specs = specs
        self.feeds = verification_feeds(specs, sample)

    @property
    def source(self) -> Source:
        return Source(kind="onnx", ref=str(self.loaded.path), sha256=self.loaded.sha256)

    @property
    def default_name(self) -> str:
        return self.loaded.path.stem

    def tool_versions(self) -> Mapping[str, str | int]:
        return {
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": self.loaded.opset,
        }

    def fold(self, step: ProgressStep) -> Folded:
        step("fold")
        self.folded = _copy(self.loaded.model)
        report = fold_batchnorms(self.folded, self.loaded.tensor_info)
        self.train = _copy(self.loaded.model)
        stat_names = build_train_graph(self.train, self.loaded.tensor_info)
        self.calibration = _copy(self.loaded.model)
        layers = source_layers(self.calibration, self.loaded.tensor_info)
        self.layer_names = [layer.name for layer in layers]
        input_stat_names = build_calibration_graph(
            self.calibration, self.loaded.tensor_info, layers
        )
        self.stat_outputs = [*stat_names, *input_stat_names]
        return Folded(report, stat_names, op_counts(self.loaded.model.graph))

    def export(self, directory: Path) -> None:
        external = needs_external_data(self.folded, source_external=self.loaded.external_data)
        graphs = {
            EVAL_GRAPH: self.folded,
            TRAIN_GRAPH: self.train,
            CALIBRATION_GRAPH: self.calibration,
        }
        self.graphs = _write_graphs(
            directory, graphs, self.specs, external=external, unbatched=self.stat_outputs
        )
        del self.folded, self.train, self.calibration  # their weights went to disk

    def verify(self, directory: Path) -> Verified:
        reference = session(self.loaded.path, optimized=False)
        notes: list[str] = []
        graphs = self.graphs
        pinned = graphs.freed_batch
        if pinned is not None:
            paths = [graphs.model_path, graphs.train_path, graphs.calibration_path]
            problem = verify_batch_growth(reference, paths, self.specs, pinned)
            if problem:
                graphs.pin_batch_again()
                notes.append(f"the batch axis stays fixed at {pinned}: {problem}")
        eval_agreement = verify_eval(reference, graphs.model_path, self.feeds)
        with TrainReference(self.loaded.model, self.loaded.tensor_info) as train_reference:
            train_agreement = verify_train(train_reference, graphs.train_path, self.feeds)
        with InputStatisticsReference(
            self.loaded.model, self.loaded.tensor_info, self.layer_names
        ) as calibration_reference:
            calibration_agreement = verify_calibration(
                calibration_reference, graphs.calibration_path, self.feeds
            )
        block = verification_block(eval_agreement, train_agreement, calibration_agreement)
        return Verified(block, notes)


def _copy(model: ModelProto) -> ModelProto:
    duplicate = ModelProto()
    duplicate.CopyFrom(model)
    return duplicate


#: A graph's inputs, outputs and value_info, copied before the batch axis is freed.
_IoSnapshot = list[list[ValueInfoProto]]


@dataclass
class _WrittenGraphs:
    """model.onnx, train.onnx and calibration.onnx on disk; `freed_batch` is the pinned size
    made symbolic."""

    directory: Path
    freed_batch: int | None
    pinned_io: dict[Path, _IoSnapshot]

    @property
    def model_path(self) -> Path:
        return self.directory / EVAL_GRAPH

    @property
    def train_path(self) -> Path:
        return self.directory / TRAIN_GRAPH

    @property
    def calibration_path(self) -> Path:
        return self.directory / CALIBRATION_GRAPH

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
    graphs: Mapping[str, ModelProto],
    specs: Sequence[InputSpec],
    *,
    external: bool,
    unbatched: Sequence[str],
) -> _WrittenGraphs:
    """Free a pinned batch axis in every graph (but on the per-channel statistics outputs
    `unbatched`), then save each under its file name (consumes their weights)."""
    written = _WrittenGraphs(directory, None, {})
    pinned = fixed_batch(specs)
    if pinned is not None:
        written.pinned_io = {
            directory / name: _io_snapshot(model) for name, model in graphs.items()
        }
        model, *others = graphs.values()
        if free_batch_axis(model, pinned, keep=unbatched):
            for other in others:
                free_batch_axis(other, pinned, keep=unbatched)
            written.freed_batch = pinned
    for name, model in graphs.items():
        save_model(model, directory / name, external=external)
    return written


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
