"""Forward fold into Gemm and MatMul(+Add), on onnx.helper graphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.convert.onnx.graph import op_counts

from onnx_helpers import (
    LATEST_OPSET,
    add_output,
    array,
    bn_initializers,
    bn_node,
    check_fold,
    fold,
    initializer,
    kept_reason,
    make_model,
    run,
)

IN, OUT = 5, 4


def gemm_bn(
    *,
    trans_b: int = 1,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias_shape: tuple[int, ...] | None = (OUT,),
    opset: int = 17,
):
    """X (N, IN) ─► Gemm(B, C; α, β, transB) ─► BN ─► Y"""
    weight_shape = (OUT, IN) if trans_b else (IN, OUT)
    inits = [initializer("B", array(1, *weight_shape)), *bn_initializers("bn", OUT)]
    inputs = ["X", "B"]
    if bias_shape is not None:
        inits.append(initializer("C", array(2, *bias_shape)))
        inputs.append("C")
    gemm = helper.make_node(
        "Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta
    )
    return make_model(
        [gemm, bn_node("g", "Y", "bn")], [("X", ["N", IN])], ["Y"], inits, opset=opset
    )


def matmul_bn(
    *,
    rank: int = 2,
    add: bool = True,
    transpose: bool = False,
    bias_first: bool = False,
    perm: tuple[int, ...] = (0, 2, 1),
    bn_channels: int = OUT,
    batch: int | str = "N",
):
    """X ─► MatMul(W) ─► [Add(b)] ─► [Transpose(perm)] ─► BN ─► Y"""
    inits = [initializer("W", array(1, IN, OUT)), *bn_initializers("bn", bn_channels)]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"], name="matmul")]
    tensor = "m"
    if add:
        inits.append(initializer("b", array(2, OUT)))
        operands = ["b", "m"] if bias_first else ["m", "b"]
        nodes.append(helper.make_node("Add", operands, ["a"], name="add"))
        tensor = "a"
    if transpose:
        nodes.append(helper.make_node("Transpose", [tensor], ["t"], name="swap", perm=perm))
        tensor = "t"
    nodes.append(bn_node(tensor, "Y", "bn"))
    shape = [batch, IN] if rank == 2 else [batch, 7, IN]
    return make_model(nodes, [("X", shape)], ["Y"], inits)


@pytest.mark.parametrize("opset", [9, 11, 14, 15, LATEST_OPSET])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds_with_trans_b_either_way(trans_b: int, opset: int) -> None:
    folded, report = check_fold(gemm_bn(trans_b=trans_b, opset=opset), folded=1)
    assert report.folded[0].into == "gemm"
    assert op_counts(folded.graph) == {"Gemm": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_and_beta_are_honoured_and_reset(trans_b: int) -> None:
    folded, _ = check_fold(gemm_bn(trans_b=trans_b, alpha=0.7, beta=-1.3), folded=1)
    (gemm,) = folded.graph.node
    attributes = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attributes["alpha"] == 1.0 and attributes["beta"] == 1.0
    assert attributes["transB"] == trans_b


@pytest.mark.parametrize("bias_shape", [None, (OUT,), (1, OUT), (1,)])
def test_gemm_bias_absent_or_broadcast(bias_shape: tuple[int, ...] | None) -> None:
    check_fold(gemm_bn(bias_shape=bias_shape, alpha=1.5, beta=0.5), folded=1)


def test_gemm_bias_per_row_keeps_the_bn() -> None:
    """C of shape (N, 1) adds per sample, not per feature: no per-channel bias to fold."""
    model = gemm_bn(bias_shape=(3, 1))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    assert kept_reason(model).startswith(
        "forward: Gemm bias C is not one value per output feature;"
    )


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bn_becomes_one_gemm(bias_first: bool) -> None:
    folded, _ = check_fold(matmul_bn(bias_first=bias_first), folded=1)
    assert op_counts(folded.graph) == {"Gemm": 1}


def test_matmul_without_add_becomes_gemm_with_bias() -> None:
    folded, _ = check_fold(matmul_bn(add=False), folded=1)
    assert op_counts(folded.graph) == {"Gemm": 1}


@pytest.mark.parametrize("add", [True, False])
def test_rank3_matmul_behind_transpose_folds(add: bool) -> None:
    folded, _ = check_fold(matmul_bn(rank=3, add=add, transpose=True), folded=1)
    assert op_counts(folded.graph) == {"MatMul": 1, "Add": 1, "Transpose": 1}


def test_rank3_matmul_without_transpose_keeps_the_bn() -> None:
    """BN normalises axis 1 (the sequence axis here), the MatMul's features are axis 2."""
    model = matmul_bn(rank=3, add=False, bn_channels=7)  # 7 = sequence length: a valid BN
    assert kept_reason(model).startswith("forward: channel axis does not line up;")


def test_transpose_with_another_perm_keeps_the_bn() -> None:
    # (N, 7, OUT) -> (7, OUT, N): the BN's channel axis holds the features, but axis 0
    # (what BN averages over) mixes sequence and batch: not a proven mapping.
    model = matmul_bn(rank=3, transpose=True, perm=(1, 2, 0), batch=3)
    assert kept_reason(model).startswith("forward: channel axis does not line up;")


def test_add_of_non_constant_is_not_a_bias() -> None:
    model = matmul_bn(add=False)
    model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, ["N", OUT]))
    model.graph.node.insert(1, helper.make_node("Add", ["m", "R"], ["a"], name="residual"))
    model.graph.node[-1].input[0] = "a"
    assert kept_reason(model).startswith(
        "forward: its input comes from Add, not Conv/ConvTranspose/Gemm/MatMul;"
    )


def test_matmul_output_read_elsewhere_keeps_the_bn() -> None:
    model = matmul_bn()
    model.graph.node.append(helper.make_node("Relu", ["m"], ["side"], name="side"))
    add_output(model, "side")
    reason = kept_reason(model)
    assert reason.startswith("forward: the MatMul output also feeds")


def test_gemm_output_that_is_a_graph_output_keeps_the_bn() -> None:
    model = gemm_bn()
    add_output(model, "g")
    assert kept_reason(model).startswith("forward: the Gemm output is a graph output;")


def test_shared_gemm_weight_is_copied() -> None:
    model = gemm_bn()
    model.graph.node.append(
        helper.make_node("Gemm", ["X", "B", "C"], ["other"], name="other", transB=1)
    )
    add_output(model, "other")
    folded, _ = check_fold(model, folded=1)
    other = next(node for node in folded.graph.node if node.name == "other")
    assert list(other.input) == ["X", "B", "C"]


def test_float64_gemm_folds_in_double_precision() -> None:
    """A double graph folds with double precision: the fold adds no float32 rounding."""
    model = gemm_bn(trans_b=0, alpha=0.5, beta=2.0)
    for tensor in model.graph.initializer:
        as_double = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array(as_double, tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    folded, _ = fold(model)
    feed = {"X": np.random.default_rng(3).standard_normal((6, IN))}
    np.testing.assert_allclose(run(folded, feed)[0], run(model, feed)[0], rtol=1e-12, atol=1e-13)
