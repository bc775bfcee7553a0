"""train.onnx from an ONNX graph: every BN normalises with its batch's statistics.

Each BatchNormalization (folded in model.onnx or not) of the *unfolded* graph
is replaced by standard ops, over the axes all but the channel axis 1:

      X ──► ReduceMean ──► mean ──────────────────────► Reshape[-1] ─► <bn>.batch_mean
      │       │
      └─► Sub(X, mean) = centred ──► Mul(centred, centred) ─► ReduceMean ─► var ─► Reshape[-1]
                 │                                                           │   ─► <bn>.batch_var
                 └───────────► Div(centred, Sqrt(var + ε)) ─► Mul(scale) ─► Add(bias) ─► Y

The variance is the biased one (divide by N·spatial), as torch normalises in
train mode; the statistics outputs are [C] float32 (a Cast is added for other
dtypes). Everything else, Dropout included, is left as it is, so model.onnx
and train.onnx differ by BatchNorm alone; onnxruntime's Dropout without a
training_mode input is the identity. ReduceMean takes its axes as an
attribute before opset 18 and as an input from 18 on; both are emitted for
the model's own opset, which stays unchanged.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper

from bnfold.convert.errors import UnsupportedSource
from bnfold.convert.onnx.batchnorm import BatchNormNode, read_batchnorms
from bnfold.convert.onnx.emitter import Emitter
from bnfold.convert.onnx.graph import GraphIndex, TensorInfo, add_initializers
from bnfold.package_format import batch_stat_output_names


def build_train_graph(model: ModelProto, tensor_info: dict[str, TensorInfo]) -> list[str]:
    """Rewrite `model` (the unfolded graph, in place) into the train graph.

    Returns the added statistics output names, two per BN with running
    statistics (a manifest layer), in graph order (the order of
    `batchnorm.layers`); every BN normalises with batch statistics either way.
    Raises UnsupportedSource when a BN's input rank is unknown or its
    running-statistics outputs are read.
    """
    index = GraphIndex(model, tensor_info)
    replacements: dict[int, list[NodeProto]] = {}
    initializers: list[TensorProto] = []
    stat_outputs: list[str] = []
    output_infos = []
    for bn in read_batchnorms(index):
        emitted, outputs, channels = _batch_statistics(index, bn)
        replacements[bn.index] = emitted.nodes
        initializers.extend(emitted.constants)
        if outputs is None:
            continue
        mean_name, var_name = outputs
        stat_outputs.extend([mean_name, var_name])
        output_infos.extend(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [channels])
            for name in (mean_name, var_name)
        )
    rebuilt: list[NodeProto] = []
    for position, node in enumerate(model.graph.node):
        rebuilt.extend(replacements.get(position, [node]))
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    add_initializers(model, initializers)
    model.graph.output.extend(output_infos)
    return stat_outputs


def _batch_statistics(
    index: GraphIndex, bn: BatchNormNode
) -> tuple[Emitter, tuple[str, str] | None, int | str | None]:
    """The BN's replacement; its statistics outputs' names when it is a manifest layer."""
    rank = index.rank(bn.input)
    if rank is None or rank < 2:
        raise UnsupportedSource(
            f"cannot build train.onnx: the rank of {bn.name}'s input is unknown to shape inference"
        )
    if any(index.is_used(name) for name in bn.node.output[1:] if name):
        raise UnsupportedSource(
            f"cannot build train.onnx: {bn.name}'s running-statistics outputs are read"
        )
    mean_output, var_output = batch_stat_output_names(bn.name)
    for name in (mean_output, var_output):
        if name in index.producer or name in index.initializers or name in index.graph_inputs:
            raise UnsupportedSource(f"cannot build train.onnx: tensor {name} already exists")
    dtype = index.elem_type(bn.input) or TensorProto.FLOAT
    emit = Emitter(index, bn.name)
    x, scale, bias = bn.node.input[0], bn.node.input[1], bn.node.input[2]
    mean, centred, var = emit.mean_and_variance(x, rank)
    epsilon = emit.constant(
        "epsilon", np.array(bn.epsilon, dtype=helper.tensor_dtype_to_np_dtype(dtype))
    )
    normalised = emit.op("Div", [centred, emit.op("Sqrt", [emit.op("Add", [var, epsilon])])])
    channel_shape = emit.constant("channel_shape", np.array([-1] + [1] * (rank - 2), np.int64))
    scale_c = emit.op("Reshape", [emit.as_type(scale, dtype), channel_shape])
    bias_c = emit.op("Reshape", [emit.as_type(bias, dtype), channel_shape])
    emit.op("Add", [emit.op("Mul", [normalised, scale_c]), bias_c], bn.output)
    if bn.statistics is None:
        return emit, None, None
    flat = emit.constant("flat", np.array([-1], np.int64))
    for statistic, name in ((mean, mean_output), (var, var_output)):
        if dtype == TensorProto.FLOAT:
            emit.op("Reshape", [statistic, flat], name)
        else:
            emit.op("Cast", [emit.op("Reshape", [statistic, flat])], name, to=TensorProto.FLOAT)
    shape = index.shape(bn.input)
    return emit, (mean_output, var_output), shape[1] if shape is not None else None
