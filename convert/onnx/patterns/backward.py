"""Backward fold of BatchNormalization into the Conv, Gemm or MatMul that reads it.

      X                               X
      |                               |
   BatchNormalization                 |
      |                               |
   [Identity | Dropout | Flatten |    [same nodes, now reading X]
    Reshape | Transpose | Pad(edge,   |
    reflect, wrap)]*        ==>       |
      |                               |
   Conv | Gemm | MatMul(W, b)       Conv | Gemm | MatMul(W', b')   W', b' = fold_before_layer(...)

Layer(scale·x + shift) = (W·diag(scale))·x + (b + W·shift) holds only when
every value the layer reads went through the BN, so the walk from the BN to
the layer admits only nodes that move values without changing them, and
tracks where the BN's channel ends up:

  * Identity, and Dropout (inference: identity; its mask output unread and
    training_mode not set), keep the layout;
  * Flatten(axis=1) and a Reshape to (N, C·S) turn channel c into S
    consecutive features (`repeats`), when the spatial size S is static;
  * Transpose perm=[0, 2, 1] moves a rank-3 channel axis last, for a MatMul;
  * Pad in edge/reflect/wrap mode copies existing values, so it commutes with
    the per-channel map, when it pads neither the batch nor the channel axis.

Zero padding does not commute (a padded 0 is not scale·0 + shift): a Conv that
pads, and Pad in constant mode, end the walk with that reason. Every tensor on
the way must have exactly one reader. ConvTranspose is not a target: at its
borders fewer inputs contribute, so the shift is not one constant per output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bnfold.convert.fold import fold_before_layer
from bnfold.convert.onnx.batchnorm import (
    REASON_CHANNEL_AXIS,
    BatchNormNode,
    collect_matches,
    remove_batchnorm,
)
from bnfold.convert.onnx.graph import GraphEdit, GraphIndex, node_attribute, renamed_input
from bnfold.convert.onnx.patterns.conv_forward import ConvLayer, read_conv, write_conv
from bnfold.convert.onnx.patterns.dense_forward import (
    SWAP_LAST_TWO,
    DenseLayer,
    read_dense,
    write_dense,
)
from bnfold.convert.report import FoldedBatchNorm

PASS_THROUGH_OPS = ("Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Pad")
TARGET_OPS = ("Conv", "Gemm", "MatMul")
VALUE_COPYING_PAD_MODES = ("edge", "reflect", "wrap")
_MAX_WALK = 16


@dataclass(frozen=True)
class Layout:
    """Where the BN's channels are in the tensor reached so far."""

    rank: int
    channel_axis: int = 1
    repeats: int = 1


@dataclass(frozen=True)
class BackwardMatch:
    bn: BatchNormNode
    path: tuple[int, ...]
    layer: ConvLayer | DenseLayer
    repeats: int

    @property
    def folded(self) -> FoldedBatchNorm:
        return FoldedBatchNorm(self.bn.name, self.layer.node.name, "backward")


def find_backward(
    index: GraphIndex, batchnorms: list[BatchNormNode]
) -> tuple[list[BackwardMatch], dict[str, str]]:
    """Match every BN whose reader chain ends in a layer; a reason for each other BN."""
    return collect_matches(batchnorms, lambda bn: _match(index, bn))


def _match(index: GraphIndex, bn: BatchNormNode) -> BackwardMatch | str:
    assert bn.params is not None
    rank = index.rank(bn.input)
    if rank is None:
        return "rank of the BN input is unknown"
    layout, tensor, path = Layout(rank), bn.output, []
    for _ in range(_MAX_WALK):
        what = "BN" if not path else index.nodes[path[-1]].op_type
        fanout = index.fanout_reason(tensor, what)
        if fanout:
            return fanout
        use = index.sole_use(tensor)
        assert use is not None
        node = index.nodes[use.index]
        if use.slot != 0:
            return f"the {what} output is not the data input of {node.op_type}"
        if node.op_type in TARGET_OPS:
            return _target(index, bn, tuple(path), use.index, layout)
        if node.op_type not in PASS_THROUGH_OPS:
            return f"the {what} output feeds {node.op_type}, not Conv/Gemm/MatMul"
        moved = _pass_through(index, use.index, tensor, layout)
        if isinstance(moved, str):
            return moved
        layout, tensor = moved, node.output[0]
        path.append(use.index)
    return "too many nodes between the BN and a layer"


def _pass_through(index: GraphIndex, position: int, tensor: str, layout: Layout) -> Layout | str:
    """The layout after the node at `position`, or why values or channels do not survive it."""
    node = index.nodes[position]
    extra_outputs = [name for name in node.output[1:] if name and index.is_used(name)]
    if extra_outputs:
        return f"the {node.op_type} node's extra outputs are read"
    op = node.op_type
    if op == "Identity":
        return layout
    if op == "Dropout":
        mode = node.input[2] if len(node.input) > 2 else ""
        if mode and not _is_false(index.constant(mode)):
            return "Dropout may run in training mode"
        return layout
    if op == "Transpose":
        perm = list(node_attribute(node, "perm") or [])
        if layout.rank == 3 and layout.channel_axis == 1 and perm == SWAP_LAST_TWO:
            return Layout(3, 2, layout.repeats)
        return REASON_CHANNEL_AXIS
    if op == "Pad":
        return _through_pad(index, node, layout)
    return _through_flatten(index, node, tensor, layout)


def _is_false(value: np.ndarray | None) -> bool:
    return value is not None and not bool(np.asarray(value).reshape(-1).any())


def _through_flatten(
    index: GraphIndex, node: NodeProto, tensor: str, layout: Layout
) -> Layout | str:
    """Flatten(axis=1) or Reshape to (N, C·S): channel c becomes S consecutive features."""
    if layout.channel_axis != 1:
        return REASON_CHANNEL_AXIS
    shape = index.shape(tensor)
    spatial = [dim for dim in shape[2:] if isinstance(dim, int)] if shape else None
    if shape is None or spatial is None or len(spatial) != len(shape) - 2:
        return f"the spatial size before {node.op_type} is not static"
    size = math.prod(spatial)
    if node.op_type == "Flatten":
        if int(node_attribute(node, "axis", 1)) != 1:
            return REASON_CHANNEL_AXIS
    else:
        out_shape = index.shape(node.output[0])
        channels = shape[1]
        if (
            out_shape is None
            or len(out_shape) != 2
            or not isinstance(channels, int)
            or out_shape[1] != channels * size
        ):
            return "the Reshape does not provably keep each channel's values together"
    return Layout(2, 1, layout.repeats * size)


def _through_pad(index: GraphIndex, node: NodeProto, layout: Layout) -> Layout | str:
    mode = node_attribute(node, "mode", "constant")
    if mode not in VALUE_COPYING_PAD_MODES:
        return f"Pad in {mode} mode adds values the BN never saw"
    if index.opset < 11:
        pads = node_attribute(node, "pads")
        axes = list(range(layout.rank))
    else:
        pads = index.constant(node.input[1]) if len(node.input) > 1 else None
        axes_input = node.input[3] if len(node.input) > 3 else ""
        axes_value = index.constant(axes_input) if axes_input else np.arange(layout.rank)
        axes = None if axes_value is None else [int(a) % layout.rank for a in axes_value]
    if pads is None or axes is None:
        return "Pad amounts are not constant"
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    for axis, begin, end in zip(axes, begins, ends, strict=True):
        if axis in (0, layout.channel_axis) and (begin or end):
            return "Pad pads the batch or channel axis"
    return layout


def _target(
    index: GraphIndex, bn: BatchNormNode, path: tuple[int, ...], position: int, layout: Layout
) -> BackwardMatch | str:
    assert bn.params is not None
    node = index.nodes[position]
    layer: ConvLayer | DenseLayer | str
    if node.op_type == "Conv":
        if layout.channel_axis != 1 or layout.repeats != 1 or layout.rank < 3:
            return REASON_CHANNEL_AXIS
        layer = read_conv(index, position)
        if isinstance(layer, str):
            return layer
        if _conv_pads(layer):
            return "the Conv zero-pads its input"
        in_channels = int(layer.weight.shape[1]) * layer.groups
    else:
        if layout.channel_axis != layout.rank - 1 or layout.rank not in (2, 3):
            return REASON_CHANNEL_AXIS
        if node.op_type == "Gemm" and int(node_attribute(node, "transA", 0)):
            return REASON_CHANNEL_AXIS
        layer = read_dense(index, position)
        if isinstance(layer, str):
            return layer
        in_channels = layer.in_features
    if in_channels != bn.params.channels * layout.repeats:
        return REASON_CHANNEL_AXIS
    return BackwardMatch(bn, path, layer, layout.repeats)


def _conv_pads(layer: ConvLayer) -> bool:
    """True if the conv reads any padded zero."""
    kernel = layer.weight.shape[2:]
    auto_pad = node_attribute(layer.node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        strides = node_attribute(layer.node, "strides") or [1] * len(kernel)
        return any(k != 1 for k in kernel) or any(s != 1 for s in strides)
    if auto_pad == "VALID":
        return False
    return any(int(p) for p in node_attribute(layer.node, "pads") or [])


def apply_backward(index: GraphIndex, matches: list[BackwardMatch]) -> GraphEdit:
    """One edit for all matches: each BN removed, its first reader rewired to X, layers rewritten."""
    edit = GraphEdit()
    for match in matches:
        assert match.bn.params is not None
        bn, layer = match.bn, match.layer
        remove_batchnorm(edit, bn)
        rewire = None
        if match.path:
            first = match.path[0]
            edit.replace(first, [renamed_input(index.nodes[first], bn.output, bn.input)])
        else:
            rewire = bn.input
        if isinstance(layer, ConvLayer):
            folded = fold_before_layer(layer.weight, layer.bias, bn.params, groups=layer.groups)
            write_conv(index, edit, layer, folded, data_input=rewire)
        else:
            folded = fold_before_layer(layer.weight, layer.bias, bn.params, repeats=match.repeats)
            write_dense(index, edit, layer, folded, data_input=rewire)
    return edit
