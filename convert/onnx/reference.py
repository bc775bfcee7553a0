"""The references an ONNX conversion is verified against, independent of how it was built.

`InputStatisticsReference` (for calibration.onnx): the original graph run by
onnxruntime with its optimizer off, with each manifest layer's BN input added
as an output; the per-channel mean, biased variance and count of those inputs
are computed in numpy float64.

`TrainReference` (for train.onnx): the original graph, BNs in numpy.

train.onnx is checked against an evaluation that shares nothing with the way
it was built. The original graph is cut at every BatchNormalization: each cut
("stage") is the slice of original nodes that computes one BN's inputs from
the graph inputs and the outputs of earlier BNs, run by onnxruntime with its
optimizer off; the BN itself is computed in numpy float64 with its batch's
mean and biased variance over all axes but 1, and its result fed to the next
stages. A final stage computes the graph outputs. The per-BN batch mean and
variance recorded on the way are the reference for train.onnx's statistics
outputs.

So the non-BN ops run the original nodes in the same runtime, and the BN maths
is checked against an independent implementation; the cost is one small
onnxruntime session per BN, built once and reused for every batch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import ModelProto, NodeProto, helper, numpy_helper

from bnfold.convert.onnx.batchnorm import BatchNormNode, read_batchnorms
from bnfold.convert.onnx.graph import GraphIndex, TensorInfo, subgraph_free_names
from bnfold.convert.onnx.io import fits_in_one_proto, save_model

#: onnxruntime's log severity for verification sessions: errors only. Its warnings about the
#: graphs as written (unused initializers, calibration.onnx's overridable running statistics)
#: say nothing a bnfold user can act on; verification judges by the numbers.
ERRORS_ONLY = 3


@dataclass
class _Stage:
    """Original nodes computing `targets` from `feeds` (names known before this stage)."""

    feeds: list[str]
    targets: list[str]
    session: onnxruntime.InferenceSession | None


@dataclass(frozen=True)
class TrainReferenceResult:
    outputs: list[np.ndarray]
    statistics: list[np.ndarray]  # mean, var per BN with running statistics, float64, in order


class TrainReference:
    """Evaluate the original graph with every BN in train mode (see the module docstring)."""

    def __init__(self, model: ModelProto, tensor_info: dict[str, TensorInfo]) -> None:
        self._index = GraphIndex(model, tensor_info)
        self._batchnorms = read_batchnorms(self._index)
        self._workdir = tempfile.TemporaryDirectory(prefix="bnfold-train-reference-")
        available = set(self._index.graph_inputs) | set(self._index.initializers)
        self._stages: list[_Stage] = []
        for bn in self._batchnorms:
            needed = [name for name in bn.node.input[:3] if self._index.constant(name) is None]
            self._stages.append(self._stage(needed, available))
            available.add(bn.output)
        outputs = [value.name for value in model.graph.output]
        self._final = self._stage(outputs, available)
        self._outputs = outputs

    def close(self) -> None:
        self._workdir.cleanup()

    def __enter__(self) -> TrainReference:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run(self, feed: Mapping[str, np.ndarray]) -> TrainReferenceResult:
        values: dict[str, np.ndarray] = dict(feed)
        statistics: list[np.ndarray] = []
        for bn, stage in zip(self._batchnorms, self._stages, strict=True):
            self._run_stage(stage, values)
            output, mean, var = self._batchnorm(bn, values)
            values[bn.output] = output
            if bn.statistics is not None:
                statistics.extend([mean, var])
        self._run_stage(self._final, values)
        return TrainReferenceResult(
            [self._value(name, values) for name in self._outputs], statistics
        )

    def _batchnorm(
        self, bn: BatchNormNode, values: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, scale, bias = (self._value(name, values) for name in bn.node.input[:3])
        x64 = x.astype(np.float64)
        axes = (0, *range(2, x64.ndim))
        channel_shape = (-1,) + (1,) * (x64.ndim - 2)
        mean = x64.mean(axis=axes, keepdims=True)
        var = np.square(x64 - mean).mean(axis=axes, keepdims=True)
        normalised = (x64 - mean) / np.sqrt(var + bn.epsilon)
        output = normalised * np.asarray(scale, np.float64).reshape(channel_shape) + np.asarray(
            bias, np.float64
        ).reshape(channel_shape)
        return output.astype(x.dtype), mean.reshape(-1), var.reshape(-1)

    def _value(self, name: str, values: dict[str, np.ndarray]) -> np.ndarray:
        if name in values:
            return values[name]
        if name in self._index.initializers:  # overridable ones too: not fed, so the default
            return numpy_helper.to_array(self._index.initializers[name])
        constant = self._index.constant(name)
        assert constant is not None, f"{name} was neither computed nor constant"
        return constant

    def _run_stage(self, stage: _Stage, values: dict[str, np.ndarray]) -> None:
        if stage.session is None:
            return
        feed = {name: values[name] for name in stage.feeds}
        for name, value in zip(stage.targets, stage.session.run(stage.targets, feed), strict=True):
            values[name] = value

    def _stage(self, wanted: list[str], available: set[str]) -> _Stage:
        """The nodes computing `wanted` from `available`, as one onnxruntime session."""
        targets = [name for name in dict.fromkeys(wanted) if name not in available]
        if not targets:
            return _Stage([], [], None)
        index = self._index
        needed: set[int] = set()
        feeds: set[str] = set()
        pending = list(targets)
        while pending:
            name = pending.pop()
            if name in available:
                if name not in index.initializers:
                    feeds.add(name)
                continue
            position = index.producer[name]
            if position in needed:
                continue
            needed.add(position)
            node = index.nodes[position]
            pending.extend(n for n in node.input if n)
            pending.extend(subgraph_free_names(node))
        nodes = [index.nodes[position] for position in sorted(needed)]
        model = self._stage_model(nodes, sorted(feeds), targets)
        return _Stage(sorted(feeds), targets, self._session(model))

    def _stage_model(
        self, nodes: list[NodeProto], feeds: list[str], targets: list[str]
    ) -> ModelProto:
        index = self._index
        read = {name for node in nodes for name in [*node.input, *subgraph_free_names(node)]}
        graph = helper.make_graph(
            nodes,
            "train_reference_stage",
            [self._value_info(name) for name in feeds],
            [self._value_info(name) for name in targets],
            [index.initializers[name] for name in sorted(read) if name in index.initializers],
        )
        source = index.model
        model = helper.make_model(
            graph, opset_imports=list(source.opset_import), ir_version=source.ir_version
        )
        model.functions.extend(source.functions)
        return model

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        elem_type = self._index.elem_type(name) or onnx.TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem_type, self._index.shape(name))

    def _session(self, model: ModelProto) -> onnxruntime.InferenceSession:
        path = Path(self._workdir.name) / f"stage_{len(self._stages)}.onnx"
        return _unoptimized_session(model, path)


class InputStatisticsReference:
    """The original graph in eval mode, and the statistics of each named BN's input.

    `run` returns the graph's outputs, then per layer (BN node name, in the
    order given) the mean and the biased variance over every axis but 1
    (float64 [C]) and the number of values per channel (int64 scalar): what
    calibration.onnx must output.
    """

    def __init__(
        self, model: ModelProto, tensor_info: dict[str, TensorInfo], layers: Sequence[str]
    ) -> None:
        nodes = {node.name: node for node in model.graph.node}
        self._inputs = [nodes[layer].input[0] for layer in layers]
        graph_inputs = {value.name for value in model.graph.input}
        self._outputs = [value.name for value in model.graph.output]
        tapped = ModelProto()
        tapped.CopyFrom(model)
        added = [
            name
            for name in dict.fromkeys(self._inputs)
            if name not in graph_inputs and name not in self._outputs
        ]
        index = GraphIndex(model, tensor_info)
        tapped.graph.output.extend(
            helper.make_tensor_value_info(
                name, index.elem_type(name) or onnx.TensorProto.FLOAT, index.shape(name)
            )
            for name in added
        )
        self._fetched = [*self._outputs, *added]
        self._workdir = tempfile.TemporaryDirectory(prefix="bnfold-calibration-reference-")
        self._session = _unoptimized_session(tapped, Path(self._workdir.name) / "tapped.onnx")

    def close(self) -> None:
        self._workdir.cleanup()

    def __enter__(self) -> InputStatisticsReference:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = dict(feed)
        values.update(zip(self._fetched, self._session.run(self._fetched, dict(feed)), strict=True))
        statistics: list[np.ndarray] = []
        for name in self._inputs:
            x = np.asarray(values[name], np.float64)
            axes = (0, *range(2, x.ndim))
            mean = x.mean(axis=axes)
            centred = x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))
            var = np.square(centred).mean(axis=axes)
            statistics.extend([mean, var, np.array(x.size // x.shape[1], np.int64)])
        return [values[name] for name in self._outputs] + statistics


def _unoptimized_session(model: ModelProto, path: Path) -> onnxruntime.InferenceSession:
    """`model` in onnxruntime with its optimizer off (the graph as written); saved to `path`
    with external data when one protobuf cannot hold it."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = ERRORS_ONLY
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if fits_in_one_proto(model):
        return onnxruntime.InferenceSession(model.SerializeToString(), options, providers)
    save_model(model, path, external=True, check=False)
    return onnxruntime.InferenceSession(str(path), options, providers)
