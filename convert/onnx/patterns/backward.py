"""Backward fold of BatchNormalization into the Conv, Gemm or MatMul that reads it.

      X                               X
      |                               |
   BatchNormalization                 |
      |                               |
   [Identity | Dropout | Flatten |    [same nodes, now reading X]
    Reshape | Transpose | Pad(edge,   |
    reflect, wrap) | Slice |  ==>     |
    Concat]*                          |
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
    the per-channel map, when it pads neither the batch nor the channel axis;
  * Slice and Concat along neither the batch nor the channel axis copy values
    within their channel. torch exports a conv's circular padding this way:

        BN ─┬─► Slice(tail) ─┐
            ├────────────────┼─► Concat(axis 2) ─► [same on axis 3] ─► Conv(pads 0)
            └─► Slice(head) ─┘

The walk is therefore over a small DAG, not a chain: every tensor on the way
may have several readers as long as each one is such a node, and a node joins
only when every value it reads (every Concat input) comes from the BN; the
walk must end in exactly one layer, which reads it as its data input. Nodes
are visited in graph order, so a Concat is judged after all of its inputs.

Zero padding does not commute (a padded 0 is not scale·0 + shift): a Conv that
pads, and Pad in constant mode, end the walk with that reason. ConvTranspose
is not a target: at its borders fewer inputs contribute, so the shift is not
one constant per output.
"""

from __future__ import annotations

import heapq
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

PASS_THROUGH_OPS = (
    "Identity",
    "Dropout",
    "Flatten",
    "Reshape",
    "Transpose",
    "Pad",
    "Slice",
    "Concat",
)
TARGET_OPS = ("Conv", "Gemm", "MatMul")
VALUE_COPYING_PAD_MODES = ("edge", "reflect", "wrap")
_MAX_WALK = 32


@dataclass(frozen=True)
class Layout:
    """Where the BN's channels are in the tensor reached so far."""

    rank: int
    channel_axis: int = 1
    repeats: int = 1


@dataclass(frozen=True)
class BackwardMatch:
    """`readers`: the pass-through nodes reading the BN output, to be rewired to its input
    (empty when the layer reads the BN output itself)."""

    bn: BatchNormNode
    readers: tuple[int, ...]
    layer: ConvLayer | DenseLayer
    repeats: int

    @property
    def folded(self) -> FoldedBatchNorm:
        return FoldedBatchNorm(self.bn.name, self.layer.node.name, "backward")


def find_backward(
    index: GraphIndex, batchnorms: list[BatchNormNode]
) -> tuple[list[BackwardMatch], dict[str, str]]:
    """Match every BN whose readers lead to one layer; a reason for each other BN."""
    return collect_matches(batchnorms, lambda bn: _match(index, bn))


def _match(index: GraphIndex, bn: BatchNormNode) -> BackwardMatch | str:
    assert bn.params is not None
    rank = index.rank(bn.input)
    if rank is None:
        return "rank of the BN input is unknown"
    reached = _walk(index, bn.output, Layout(rank))
    if isinstance(reached, str):
        return reached
    position, layout = reached
    readers = {use.index for use in index.uses[bn.output]} - {position}
    return _target(index, bn, tuple(sorted(readers)), position, layout)


def _walk(index: GraphIndex, start: str, layout: Layout) -> tuple[int, Layout] | str:
    """The position of the one layer the values of `start` reach, and their layout there.

    Pass-through nodes are visited in graph order (a heap of positions), so a
    Concat is judged only once every region tensor before it is known.
    """
    layouts = {start: layout}
    pending: list[int] = []
    target: tuple[int, Layout] | None = None
    tensor, what = start, "BN"
    visited = 0
    while True:
        reached = _readers(index, tensor, what)
        if isinstance(reached, str):
            return reached
        if isinstance(reached, int):
            if target is not None:
                return "the BN's values reach more than one layer"
            target = (reached, layouts[tensor])
        else:
            for position in reached:
                if position not in pending:
                    heapq.heappush(pending, position)
        if not pending:
            break
        visited += 1
        if visited > _MAX_WALK:
            return "too many nodes between the BN and a layer"
        node = index.nodes[heapq.heappop(pending)]
        moved = _pass_through(index, node, layouts)
        if isinstance(moved, str):
            return moved
        tensor, what = node.output[0], node.op_type
        layouts[tensor] = moved
    assert target is not None  # every region tensor is read; the last readers are layers
    return target


def _readers(index: GraphIndex, tensor: str, what: str) -> int | list[int] | str:
    """Where the values in `tensor` go: the layer reading it (its position), the pass-through
    nodes reading it, or why the BN cannot fold backward through it."""
    if tensor in index.graph_outputs:
        return f"the {what} output is a graph output"
    uses = index.uses.get(tensor, [])
    if not uses:
        return f"the {what} output is unused"
    nodes = [index.nodes[use.index] for use in uses]
    if len(uses) > 1 and any(node.op_type not in PASS_THROUGH_OPS for node in nodes):
        return f"the {what} output also feeds {len(uses) - 1} other node(s)"
    for use, node in zip(uses, nodes, strict=True):
        if use.slot != 0 and (node.op_type != "Concat" or use.slot < 0):
            return f"the {what} output is not the data input of {node.op_type}"
    if nodes[0].op_type in TARGET_OPS:
        return uses[0].index
    if nodes[0].op_type not in PASS_THROUGH_OPS:
        return f"the {what} output feeds {nodes[0].op_type}, not Conv/Gemm/MatMul"
    return [use.index for use in uses]


def _pass_through(index: GraphIndex, node: NodeProto, layouts: dict[str, Layout]) -> Layout | str:
    """The layout of the node's output, or why values or channels do not survive it.

    `layouts` holds every tensor known to carry only BN output values; all
    nodes before this one in graph order have been visited.
    """
    extra_outputs = [name for name in node.output[1:] if name and index.is_used(name)]
    if extra_outputs:
        return f"the {node.op_type} node's extra outputs are read"
    op = node.op_type
    if op == "Concat":
        return _through_concat(node, layouts)
    layout = layouts.get(node.input[0])
    if layout is None:
        return f"the {op} node's data input did not go through the BN"
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
    if op == "Slice":
        return _through_slice(index, node, layout)
    return _through_flatten(index, node, layout)


def _is_false(value: np.ndarray | None) -> bool:
    return value is not None and not bool(np.asarray(value).reshape(-1).any())


def _through_flatten(index: GraphIndex, node: NodeProto, layout: Layout) -> Layout | str:
    """Flatten(axis=1) or Reshape to (N, C·S): channel c becomes S consecutive features."""
    if layout.channel_axis != 1:
        return REASON_CHANNEL_AXIS
    shape = index.shape(node.input[0])
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


def _through_slice(index: GraphIndex, node: NodeProto, layout: Layout) -> Layout | str:
    """A Slice keeps each value in its channel unless it cuts the channel (or batch) axis."""
    if index.opset < 10:
        axes = node_attribute(node, "axes")
        if axes is None:
            axes = range(len(node_attribute(node, "starts") or []))
    else:
        axes_input = node.input[3] if len(node.input) > 3 else ""
        if axes_input:
            axes = index.constant(axes_input)
        else:
            starts = index.constant(node.input[1])
            axes = None if starts is None else range(np.asarray(starts).size)
    if axes is None:
        return "Slice axes are not constant"
    for axis in np.asarray(list(axes), dtype=np.int64).reshape(-1):
        if int(axis) % layout.rank in (0, layout.channel_axis):
            return "Slice cuts the batch or channel axis"
    return layout


def _through_concat(node: NodeProto, layouts: dict[str, Layout]) -> Layout | str:
    """A Concat of BN values only, all laid out alike, along neither the batch nor the channel axis."""
    found = [layouts.get(name) for name in node.input]
    if any(layout is None for layout in found):
        return "Concat joins the BN's values with values that did not go through it"
    if len(set(found)) != 1:
        return REASON_CHANNEL_AXIS
    layout = found[0]
    assert layout is not None
    if int(node_attribute(node, "axis", 0)) % layout.rank in (0, layout.channel_axis):
        return "Concat joins along the batch or channel axis"
    return layout


def _target(
    index: GraphIndex,
    bn: BatchNormNode,
    readers: tuple[int, ...],
    position: int,
    layout: Layout,
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
    return BackwardMatch(bn, readers, layer, layout.repeats)


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
    """One edit for all matches: each BN removed, its readers rewired to X, layers rewritten."""
    edit = GraphEdit()
    for match in matches:
        assert match.bn.params is not None
        bn, layer = match.bn, match.layer
        remove_batchnorm(edit, bn)
        for reader in match.readers:
            edit.replace(reader, [renamed_input(index.nodes[reader], bn.output, bn.input)])
        rewire = None if match.readers else bn.input
        if isinstance(layer, ConvLayer):
            folded = fold_before_layer(layer.weight, layer.bias, bn.params, groups=layer.groups)
            write_conv(index, edit, layer, folded, data_input=rewire)
        else:
            folded = fold_before_layer(layer.weight, layer.bias, bn.params, repeats=match.repeats)
            write_dense(index, edit, layer, folded, data_input=rewire)
    return edit
