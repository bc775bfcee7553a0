"""Forward fold of BatchNormalization into a Gemm, or a MatMul with a constant weight.

      X                                   X
      |                                   |
   Gemm(B, C; α, β, transB)            Gemm(B'', C''; α=β=1, same transB)
      |                       ==>         |
   BatchNormalization                     Y
      |
      Y

      X (N, K)                 X              X (N, L, K)                X
      |                        |              |                          |
   MatMul(W)                Gemm(W', b')   MatMul(W)                  MatMul(W')
      |                        |              |                          |
   [Add(b)]        ==>         Y           [Add(b)]          ==>      Add(b')
      |                                       |                          |
   BatchNormalization                      Transpose(perm=0,2,1)      Transpose(perm=0,2,1)
      |                                       |                          |
      Y                                    BatchNormalization            Y
                                              |
                                              Y

The arithmetic is `fold_after_layer` on the out-first weight: Gemm's B as is
when transB=1, else Bᵀ; MatMul's (in, out) weight transposed. α is multiplied
into the weight and β into the bias before the fold, so the rewritten Gemm has
α = β = 1; the result is transposed back to the layer's own layout and cast
once to its dtype. A 2-D MatMul (with or without its Add) becomes one Gemm.

BN normalises axis 1 of its input; a dense layer's features are its last
axis. They coincide for 2-D outputs, and for 3-D outputs only behind a
Transpose perm=[0, 2, 1]; every other layout is kept with "channel axis does
not line up", as is an unknown rank. An Add only counts as the layer's bias
when the other operand is a constant broadcast along the feature axis alone.

`read_dense` and `write_dense` are shared with the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from bnfold.convert.fold import FoldedWeights, fold_after_layer
from bnfold.convert.onnx.batchnorm import (
    REASON_CHANNEL_AXIS,
    BatchNormNode,
    collect_matches,
    remove_batchnorm,
)
from bnfold.convert.onnx.graph import (
    GraphEdit,
    GraphIndex,
    copy_node,
    node_attribute,
    set_attribute,
)
from bnfold.convert.report import FoldedBatchNorm

DENSE_OPS = ("Gemm", "MatMul")
SWAP_LAST_TWO = [0, 2, 1]


@dataclass(frozen=True)
class DenseLayer:
    """A Gemm, or a MatMul with constant 2-D weight plus, optionally, the Add of its bias.

    `weight` is out-first (out, in) in float64 with α applied; `bias` is (out,)
    in float64 with β applied, or None. `output` is the tensor holding the
    layer's result: the Add's output when the bias Add belongs to the layer.
    """

    index: int
    node: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    output: str
    input_rank: int | None
    add_index: int | None = None

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class DenseForwardMatch:
    bn: BatchNormNode
    layer: DenseLayer
    transpose_index: int | None

    @property
    def folded(self) -> FoldedBatchNorm:
        return FoldedBatchNorm(self.bn.name, self.layer.node.name, "forward")


def read_dense(index: GraphIndex, position: int) -> DenseLayer | str:
    """The Gemm/MatMul at `position` as a dense layer, or why it cannot be rewritten."""
    node = index.nodes[position]
    weight = index.constant(node.input[1])
    if weight is None:
        return index.not_constant_reason(node.input[1], f"{node.op_type} weight")
    if not np.issubdtype(weight.dtype, np.floating):
        return f"{node.op_type} weight is not floating point"
    if node.op_type == "Gemm":
        return _read_gemm(index, position, weight)
    if weight.ndim != 2:
        return "MatMul weight is not 2-D"
    rank = index.rank(node.input[0])
    layer = DenseLayer(
        position, node, weight.astype(np.float64).T, None, weight.dtype, node.output[0], rank
    )
    use = index.sole_use(node.output[0])
    if use is None or index.nodes[use.index].op_type != "Add":
        return layer
    add = index.nodes[use.index]
    bias = index.constant(add.input[1 - use.slot])
    features = _per_feature(bias, layer.out_features, rank)
    if features is None:
        return layer
    return DenseLayer(
        position, node, layer.weight, features, weight.dtype, add.output[0], rank, use.index
    )


def _read_gemm(index: GraphIndex, position: int, weight: np.ndarray) -> DenseLayer | str:
    node = index.nodes[position]
    alpha = float(node_attribute(node, "alpha", 1.0))
    beta = float(node_attribute(node, "beta", 1.0))
    weight64 = weight.astype(np.float64) * alpha
    out_first = weight64 if int(node_attribute(node, "transB", 0)) else weight64.T
    bias = None
    if len(node.input) > 2 and node.input[2]:
        constant = index.constant(node.input[2])
        if constant is None:
            return index.not_constant_reason(node.input[2], "Gemm bias C")
        bias = _per_feature(constant.astype(np.float64) * beta, out_first.shape[0], 2)
        if bias is None:
            return "Gemm bias C is not one value per output feature"
    return DenseLayer(position, node, out_first, bias, weight.dtype, node.output[0], 2)


def _per_feature(values: np.ndarray | None, features: int, rank: int | None) -> np.ndarray | None:
    """`values` as one bias per feature, if adding it broadcasts along the last axis alone."""
    if values is None or not np.issubdtype(values.dtype, np.floating):
        return None
    if rank is None or values.ndim > rank:
        return None
    if values.size == 1:
        return np.full(features, float(values.reshape(())), dtype=np.float64)
    if values.size == features and values.shape[-1] == features:
        return values.reshape(features).astype(np.float64)
    return None


def find_dense_forward(
    index: GraphIndex, batchnorms: list[BatchNormNode]
) -> tuple[list[DenseForwardMatch], dict[str, str]]:
    """Match every BN fed by a dense layer; reasons for the dense-fed BNs that cannot fold."""
    return collect_matches(batchnorms, lambda bn: _match(index, bn))


def _match(index: GraphIndex, bn: BatchNormNode) -> DenseForwardMatch | str | None:
    """None when no dense layer feeds the BN (not this family's business)."""
    assert bn.params is not None
    tensor, transpose_index = bn.input, None
    producer = index.producer.get(tensor)
    if producer is not None and index.nodes[producer].op_type == "Transpose":
        transpose_index, tensor = producer, index.nodes[producer].input[0]
    position = _dense_producer(index, tensor)
    if position is None:
        return None
    layer = read_dense(index, position)
    if isinstance(layer, str):
        return layer
    if layer.output != tensor:
        # The Add is not the MatMul's bias: the MatMul feeds more than the Add (say why),
        # or the Add's other operand is not a constant bias (not this family's business).
        return index.fanout_reason(layer.node.output[0], layer.node.op_type)
    what = "MatMul+Add" if layer.add_index is not None else layer.node.op_type
    fanout = index.fanout_reason(layer.output, what)
    if transpose_index is not None:
        fanout = fanout or index.fanout_reason(bn.input, "Transpose")
    if fanout:
        return fanout
    if transpose_index is None:
        lined_up = layer.input_rank == 2
    else:
        perm = node_attribute(index.nodes[transpose_index], "perm")
        lined_up = layer.input_rank == 3 and list(perm or []) == SWAP_LAST_TWO
    if not lined_up or layer.out_features != bn.params.channels:
        return REASON_CHANNEL_AXIS
    return DenseForwardMatch(bn, layer, transpose_index)


def _dense_producer(index: GraphIndex, tensor: str) -> int | None:
    """The Gemm/MatMul computing `tensor`, directly or through the Add of its bias."""
    position = index.producer.get(tensor)
    if position is None:
        return None
    node = index.nodes[position]
    if node.op_type in DENSE_OPS:
        return position
    if node.op_type == "Add":
        for name in node.input:
            candidate = index.producer.get(name)
            if candidate is not None and index.nodes[candidate].op_type == "MatMul":
                return candidate
    return None


def apply_dense_forward(index: GraphIndex, matches: list[DenseForwardMatch]) -> GraphEdit:
    """One edit for all matches: each layer rewritten, each BN removed."""
    edit = GraphEdit()
    for match in matches:
        assert match.bn.params is not None
        folded = fold_after_layer(match.layer.weight, match.layer.bias, match.bn.params)
        if match.transpose_index is None:
            write_dense(index, edit, match.layer, folded, output=match.bn.output)
        else:
            write_dense(index, edit, match.layer, folded)
            transpose = copy_node(index.nodes[match.transpose_index])
            transpose.output[0] = match.bn.output
            edit.replace(match.transpose_index, [transpose])
        remove_batchnorm(edit, match.bn)
    return edit


def write_dense(
    index: GraphIndex,
    edit: GraphEdit,
    layer: DenseLayer,
    folded: FoldedWeights,
    *,
    output: str | None = None,
    data_input: str | None = None,
) -> None:
    """Replace the layer by one with fresh weight/bias initializers in its own layout.

    `folded` is out-first; Gemm keeps its transB, MatMul gets (in, out). A 2-D
    MatMul becomes a Gemm; a higher-rank one keeps (or gains) an Add for the bias.
    """
    node = layer.node
    stem = node.name or node.output[0]
    out_first = folded.weight.astype(layer.dtype)
    bias = np.ascontiguousarray(folded.bias.astype(layer.dtype))
    result = output or layer.output
    source = data_input or node.input[0]
    bias_name = edit.add_initializer(index.unique_name(f"{stem}.folded_bias"), bias)
    edit.release(node.input[1:3])
    if node.op_type == "Gemm":
        transposed_back = out_first if int(node_attribute(node, "transB", 0)) else out_first.T
        weight_name = edit.add_initializer(
            index.unique_name(f"{stem}.folded_weight"), transposed_back
        )
        gemm = copy_node(node)
        del gemm.input[:]
        gemm.input.extend([source, weight_name, bias_name])
        gemm.output[0] = result
        set_attribute(gemm, "alpha", 1.0)
        set_attribute(gemm, "beta", 1.0)
        edit.replace(layer.index, [gemm])
        return
    weight_name = edit.add_initializer(index.unique_name(f"{stem}.folded_weight"), out_first.T)
    if layer.add_index is not None:
        add = index.nodes[layer.add_index]
        edit.release(add.input)
    if layer.input_rank == 2:
        gemm = helper.make_node("Gemm", [source, weight_name, bias_name], [result], name=node.name)
        edit.replace(layer.index, [gemm])
        if layer.add_index is not None:
            edit.remove(layer.add_index)
        return
    matmul = copy_node(node)
    del matmul.input[:]
    matmul.input.extend([source, weight_name])
    matmul_output = index.unique_name(f"{stem}.folded_output")
    matmul.output[0] = matmul_output
    add_name = index.unique_name(f"{stem}.folded_bias_add")
    add = helper.make_node("Add", [matmul_output, bias_name], [result], name=add_name)
    edit.replace(layer.index, [matmul, add])
    if layer.add_index is not None:
        edit.remove(layer.add_index)
