"""Forward fold of BatchNormalization into the Conv or ConvTranspose that feeds it.

        X                          X
        |                          |
   Conv(W, b)  [any group,    Conv(W', b')      W', b' = fold_after_layer(W, b, bn)
        |       b optional]        |            (ConvTranspose: transposed=True, groups)
   BatchNormalization   ==>        Y
        |
        Y

The conv writes straight to the BN's output name, so whatever read Y (or the
graph output Y) is untouched. Guards: the conv output has no other reader and
is not a graph output; W and b are constant; the BN's channel count is the
conv's output channel count. The folded weights always go to fresh
initializers, so a weight shared with another node is copied, never changed.

`read_conv` and `write_conv` are shared with the backward pass, which folds a
BN into the conv that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bnfold.convert.fold import FoldedWeights, fold_after_layer
from bnfold.convert.onnx.batchnorm import (
    REASON_CHANNEL_AXIS,
    BatchNormNode,
    collect_matches,
    remove_batchnorm,
)
from bnfold.convert.onnx.graph import GraphEdit, GraphIndex, copy_node, node_attribute
from bnfold.convert.report import FoldedBatchNorm

CONV_OPS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class ConvLayer:
    """A Conv or ConvTranspose with constant weight (and bias, when it has one)."""

    index: int
    node: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def transposed(self) -> bool:
        return self.node.op_type == "ConvTranspose"

    @property
    def groups(self) -> int:
        return int(node_attribute(self.node, "group", 1))

    @property
    def output_channels(self) -> int:
        if self.transposed:
            return int(self.weight.shape[1]) * self.groups
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class ConvForwardMatch:
    bn: BatchNormNode
    layer: ConvLayer

    @property
    def folded(self) -> FoldedBatchNorm:
        return FoldedBatchNorm(self.bn.name, self.layer.node.name, "forward")


def read_conv(index: GraphIndex, position: int) -> ConvLayer | str:
    """The conv at `position` with its constant parameters, or why it cannot be rewritten."""
    node = index.nodes[position]
    weight = index.constant(node.input[1])
    if weight is None:
        return index.not_constant_reason(node.input[1], f"{node.op_type} weight")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = index.constant(node.input[2])
        if bias is None:
            return index.not_constant_reason(node.input[2], f"{node.op_type} bias")
    if not np.issubdtype(weight.dtype, np.floating):
        return f"{node.op_type} weight is not floating point"
    return ConvLayer(position, node, weight, bias)


def find_conv_forward(
    index: GraphIndex, batchnorms: list[BatchNormNode]
) -> tuple[list[ConvForwardMatch], dict[str, str]]:
    """Match every BN fed by a conv; reasons for the conv-fed BNs that cannot fold."""
    return collect_matches(batchnorms, lambda bn: _match(index, bn))


def _match(index: GraphIndex, bn: BatchNormNode) -> ConvForwardMatch | str | None:
    """None when no conv feeds the BN (not this family's business)."""
    assert bn.params is not None
    position = index.producer.get(bn.input)
    if position is None or index.nodes[position].op_type not in CONV_OPS:
        return None
    node = index.nodes[position]
    fanout = index.fanout_reason(bn.input, node.op_type)
    if fanout:
        return fanout
    layer = read_conv(index, position)
    if isinstance(layer, str):
        return layer
    if layer.output_channels != bn.params.channels:
        return REASON_CHANNEL_AXIS
    return ConvForwardMatch(bn, layer)


def apply_conv_forward(index: GraphIndex, matches: list[ConvForwardMatch]) -> GraphEdit:
    """One edit for all matches: each conv rewritten to produce its BN's output."""
    edit = GraphEdit()
    for match in matches:
        assert match.bn.params is not None
        layer = match.layer
        folded = fold_after_layer(
            layer.weight,
            layer.bias,
            match.bn.params,
            transposed=layer.transposed,
            groups=layer.groups,
        )
        write_conv(index, edit, layer, folded, output=match.bn.output)
        remove_batchnorm(edit, match.bn)
    return edit


def write_conv(
    index: GraphIndex,
    edit: GraphEdit,
    layer: ConvLayer,
    folded: FoldedWeights,
    *,
    output: str | None = None,
    data_input: str | None = None,
) -> None:
    """Replace the conv with one reading fresh W', b' initializers (and maybe renamed edges)."""
    node = copy_node(layer.node)
    stem = node.name or node.output[0]
    weight_name = edit.add_initializer(index.unique_name(f"{stem}.folded_weight"), folded.weight)
    bias_name = edit.add_initializer(index.unique_name(f"{stem}.folded_bias"), folded.bias)
    edit.release(node.input[1:3])
    del node.input[1:]
    node.input.extend([weight_name, bias_name])
    if data_input is not None:
        node.input[0] = data_input
    if output is not None:
        node.output[0] = output
    edit.replace(layer.index, [node])
