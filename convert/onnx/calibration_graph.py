"""calibration.onnx: the unfolded eval graph with overridable running statistics and taps.

The service's drift monitor and `bnfold recalibrate` (both torch-free) need
what neither model.onnx (BNs folded away) nor train.onnx (batch statistics)
gives: the model exactly as it evaluates, with every manifest layer still a
real BatchNormalization node, and the statistics of each such BN's *input*.
For every layer L (the manifest's `batchnorm.layers`, in order):

      <L>.running_mean ─┐ (graph input + initializer: an overridable default,
      <L>.running_var  ─┤  float32 [C]; a Cast when the BN's dtype differs)
                        ▼
      X ───────────► BatchNormalization (node name L, eval mode) ─► ...
      │
      ├─► [Cast f32] ─► ReduceMean ─► mean ─► Reshape[-1] ───────────────► <L>.input_mean
      │                   └─► Sub ─► Mul(c, c) ─► ReduceMean ─► Reshape[-1] ─► <L>.input_var
      └─► Size ─► Div(C) ─────────────────────────────────────────────────► <L>.input_count

The mean and the *biased* variance are over N and the spatial axes of this
run (mean of squared deviations from this run's mean), and the count is the
number of values per channel they summarise (int64 scalar, N x spatial), so
runs of any batch size pool exactly (Chan's formula, `bnfold.bn_statistics`).
Graph outputs: the model's outputs first, then the three per layer.

`unfolded_source` undoes the interface: the plain unfolded eval graph with the
running statistics constant again (new ones when given), which the ONNX
adapter re-converts with the same layer names (BN node names are layer names).

Torch-free: the serving install builds nothing here but recalibrates with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from bnfold.convert.errors import UnsupportedSource
from bnfold.convert.onnx.batchnorm import BATCHNORM, read_batchnorms
from bnfold.convert.onnx.emitter import Emitter
from bnfold.convert.onnx.graph import (
    OVERRIDABLE_INITIALIZERS_IR_VERSION,
    GraphIndex,
    TensorInfo,
    add_initializers,
    iter_nodes,
    overridable_initializers,
    remove_orphans,
)
from bnfold.package_format import input_stat_output_names, running_stat_input_names

#: The slots of BatchNormalization's running mean and variance inputs.
_MEAN_SLOT, _VAR_SLOT = 3, 4


@dataclass(frozen=True)
class CalibrationLayer:
    """One manifest layer: the BN node of that name, and its running statistics (the defaults)."""

    name: str
    running_mean: np.ndarray
    running_var: np.ndarray

    @property
    def channels(self) -> int:
        return int(np.asarray(self.running_mean).size)


def build_calibration_graph(
    model: ModelProto, tensor_info: dict[str, TensorInfo], layers: Sequence[CalibrationLayer]
) -> list[str]:
    """Rewrite `model` (the unfolded eval graph, in place) into calibration.onnx.

    Each layer's BN must be a node named after the layer. Its running mean and
    variance inputs become the graph inputs `running_stat_input_names(layer)`,
    each with an initializer holding the layer's statistics. A tensor of that
    name that this BN alone reads in that slot is adopted (the torch exporter
    makes such inputs; `unfolded_source` leaves such constants). Returns the added
    statistics outputs, three per layer, in order. Raises UnsupportedSource
    when a BN cannot be found, its input rank is unknown, or a name is taken.
    """
    _require_overridable_initializers(model)
    index = GraphIndex(model, tensor_info)
    batchnorms = {node.name: position for position, node in iter_nodes(model.graph, BATCHNORM)}
    replacements: dict[int, list[NodeProto]] = {}
    constants: list[TensorProto] = []
    stat_inputs: list[onnx.ValueInfoProto] = []
    stat_outputs: list[onnx.ValueInfoProto] = []
    released: list[str] = []
    for layer in layers:
        position = batchnorms.get(layer.name)
        if position is None:
            raise UnsupportedSource(
                f"cannot build calibration.onnx: no BatchNormalization node is named {layer.name}"
            )
        emitted, node = _layer_interface(index, index.nodes[position], layer)
        replacements[position] = [*emitted.nodes, node]
        constants.extend(emitted.constants)
        mean_name, var_name = running_stat_input_names(layer.name)
        constants.extend(
            numpy_helper.from_array(np.asarray(values, np.float32).reshape(-1), name)
            for name, values in ((mean_name, layer.running_mean), (var_name, layer.running_var))
        )
        stat_inputs.extend(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [layer.channels])
            for name in (mean_name, var_name)
        )
        mean_output, var_output, count_output = input_stat_output_names(layer.name)
        stat_outputs.extend(
            [
                helper.make_tensor_value_info(mean_output, TensorProto.FLOAT, [layer.channels]),
                helper.make_tensor_value_info(var_output, TensorProto.FLOAT, [layer.channels]),
                helper.make_tensor_value_info(count_output, TensorProto.INT64, []),
            ]
        )
        released.extend(index.nodes[position].input[_MEAN_SLOT : _VAR_SLOT + 1])
    graph = model.graph
    rebuilt: list[NodeProto] = []
    for position, node in enumerate(graph.node):
        rebuilt.extend(replacements.get(position, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    # The running-stat names are new or adopted: an adopted input or constant is replaced.
    interface = {value.name for value in stat_inputs}
    model_inputs = [value for value in graph.input if value.name not in interface]
    del graph.input[:]
    graph.input.extend([*model_inputs, *stat_inputs])
    for position in reversed(range(len(graph.initializer))):
        if graph.initializer[position].name in interface:
            del graph.initializer[position]
    add_initializers(model, constants)
    graph.output.extend(stat_outputs)
    remove_orphans(model, [name for name in released if name not in interface])
    return [value.name for value in stat_outputs]


def source_layers(model: ModelProto, tensor_info: dict[str, TensorInfo]) -> list[CalibrationLayer]:
    """The manifest layers of an ONNX graph (its BNs with running statistics), in graph order:
    the same list, by the same rule, as the fold report's `layers`."""
    return [
        CalibrationLayer(bn.name, *bn.statistics)
        for bn in read_batchnorms(GraphIndex(model, tensor_info))
        if bn.statistics is not None
    ]


def _require_overridable_initializers(model: ModelProto) -> None:
    """Raise an IR 3 model to IR 4, where an initializer listed as an input is overridable.

    IR 3 lists every initializer among the inputs, and bnfold reads them as
    constants there (`overridable_initializers`). calibration.onnx keeps them
    constant while its running statistics become overridable, which only IR 4
    can say: the IR 3 listings go.
    """
    if model.ir_version >= OVERRIDABLE_INITIALIZERS_IR_VERSION:
        return
    initializers = {tensor.name for tensor in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = OVERRIDABLE_INITIALIZERS_IR_VERSION


def _layer_interface(
    index: GraphIndex, bn: NodeProto, layer: CalibrationLayer
) -> tuple[Emitter, NodeProto]:
    """The taps and casts for one layer, and the BN node reading the running-stat inputs."""
    x = bn.input[0]
    rank = index.rank(x)
    if rank is None or rank < 2:
        raise UnsupportedSource(
            f"cannot build calibration.onnx: the rank of {layer.name}'s input is unknown "
            "to shape inference"
        )
    mean_input, var_input = running_stat_input_names(layer.name)
    outputs = input_stat_output_names(layer.name)
    for name in (mean_input, var_input, *outputs):
        if not _adoptable(index, bn, name) and index.unique_name(name) != name:
            raise UnsupportedSource(f"cannot build calibration.onnx: tensor {name} already exists")
    emit = Emitter(index, layer.name)
    node = onnx.NodeProto()
    node.CopyFrom(bn)
    for slot, name in ((_MEAN_SLOT, mean_input), (_VAR_SLOT, var_input)):
        dtype = index.elem_type(bn.input[slot]) or index.elem_type(x) or TensorProto.FLOAT
        node.input[slot] = name if dtype == TensorProto.FLOAT else emit.op("Cast", [name], to=dtype)
    x_float = emit.as_type(x, TensorProto.FLOAT)
    mean, _, var = emit.mean_and_variance(x_float, rank)
    flat = emit.constant("flat", np.array([-1], np.int64))
    mean_output, var_output, count_output = outputs
    emit.op("Reshape", [mean, flat], mean_output)
    emit.op("Reshape", [var, flat], var_output)
    channels = emit.constant("channels", np.array(layer.channels, np.int64))
    emit.op("Div", [emit.op("Size", [x]), channels], count_output)
    return emit, node


def _adoptable(index: GraphIndex, bn: NodeProto, name: str) -> bool:
    """Whether `name` is the BN's running mean or variance input, read by nothing else."""
    uses = index.uses.get(name, [])
    return (
        name in (bn.input[_MEAN_SLOT], bn.input[_VAR_SLOT])
        and name not in index.graph_outputs
        and len(uses) == 1
        and name not in index.producer
    )


def unfolded_source(
    calibration: ModelProto,
    statistics: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> ModelProto:
    """The plain unfolded eval graph calibration.onnx was built from, as a new model.

    The running statistics become constants again (the graph's defaults, or
    `statistics[layer]` = (running_mean, running_var) for the layers given), and
    only the model's own inputs and outputs remain. The ONNX adapter converts
    the result into a package with the same layer names. Raises ValueError for
    a layer calibration.onnx does not have or statistics of the wrong shape.
    """
    model = ModelProto()
    model.CopyFrom(calibration)
    graph = model.graph
    layers = calibration_layers(model)
    unknown = sorted(set(statistics or {}) - set(layers))
    if unknown:
        raise ValueError(
            f"calibration.onnx has no BatchNorm layer {unknown[0]}; it has {', '.join(layers)}"
        )
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for layer, values in (statistics or {}).items():
        for name, value in zip(running_stat_input_names(layer), values, strict=True):
            tensor = initializers[name]
            array = np.asarray(value, dtype=np.float32)
            if array.shape != tuple(tensor.dims):
                raise ValueError(
                    f"{name} needs shape {tuple(tensor.dims)}, got statistics of shape "
                    f"{array.shape}"
                )
            tensor.CopyFrom(numpy_helper.from_array(array, name))
    stat_inputs = {name for layer in layers for name in running_stat_input_names(layer)}
    stat_outputs = {name for layer in layers for name in input_stat_output_names(layer)}
    model_inputs = [value for value in graph.input if value.name not in stat_inputs]
    del graph.input[:]
    graph.input.extend(model_inputs)
    model_outputs = [value for value in graph.output if value.name not in stat_outputs]
    del graph.output[:]
    graph.output.extend(model_outputs)
    remove_orphans(model, stat_outputs)
    return model


def calibration_layers(calibration: ModelProto) -> list[str]:
    """The layer names of a calibration graph, in graph order: its BatchNormalization nodes
    with an overridable running-mean input named after the node."""
    overridable = overridable_initializers(calibration)
    return [
        node.name
        for _, node in iter_nodes(calibration.graph, BATCHNORM)
        if running_stat_input_names(node.name)[0] in overridable
    ]
