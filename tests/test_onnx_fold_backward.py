"""Backward fold into the Conv/Gemm/MatMul that reads a BN, on onnx.helper graphs.

Each graph starts with a Relu so no forward fold is possible: whatever folds
here folds backward.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold.convert.onnx.graph import op_counts

from onnx_helpers import (
    add_output,
    array,
    bn_initializers,
    bn_node,
    check_fold,
    initializer,
    kept_reason,
    make_model,
)

C = 4


def bn_then(
    between: list,
    layer: str,
    *,
    shape: list,
    extra_inits: list | None = None,
    kernel: int = 3,
    layer_channels: int = C,
    **layer_attrs: object,
):
    """X ─► Relu ─► BN ─► [between…] ─► Conv | ConvTranspose | Gemm | MatMul ─► Y

    `layer_channels` is what the layer reads (C unless something in between
    changes it); the layer has 4 outputs.
    """
    inits = [*bn_initializers("bn", C), *(extra_inits or [])]
    nodes = [helper.make_node("Relu", ["X"], ["r"], name="relu"), bn_node("r", "n", "bn")]
    tensor = "n"
    for position, (op, attrs, extra_inputs) in enumerate(between):
        output = f"t{position}"
        nodes.append(
            helper.make_node(
                op, [tensor, *extra_inputs], [output], name=f"{op}_{position}", **attrs
            )
        )
        tensor = output
    groups = int(layer_attrs.get("group", 1))
    spatial = [kernel] * (len(shape) - 2)
    weight_shape = {
        "Conv": [4, layer_channels // groups, *spatial],
        "ConvTranspose": [layer_channels, 4 // groups, *spatial],
        "Gemm": [4, layer_channels] if layer_attrs.get("transB") else [layer_channels, 4],
        "MatMul": [layer_channels, 4],
    }[layer]
    inits.append(initializer("W", array(5, *weight_shape)))
    inputs = [tensor, "W"]
    if layer != "MatMul":
        inits.append(initializer("b", array(6, 4)))
        inputs.append("b")
    nodes.append(helper.make_node(layer, inputs, ["Y"], name="layer", **layer_attrs))
    return make_model(nodes, [("X", shape)], ["Y"], inits)


def test_bn_into_following_conv_without_padding() -> None:
    folded, report = check_fold(bn_then([], "Conv", shape=["N", C, 6, 6]), folded=1)
    assert report.folded[0].direction == "backward" and report.folded[0].into == "layer"
    assert op_counts(folded.graph) == {"Relu": 1, "Conv": 1}


def test_bn_into_grouped_conv() -> None:
    check_fold(bn_then([], "Conv", shape=["N", C, 6, 6], group=2), folded=1)


def test_bn_into_conv_with_same_padding_of_a_1x1_kernel() -> None:
    model = bn_then([], "Conv", shape=["N", C, 6, 6], kernel=1, auto_pad="SAME_UPPER")
    check_fold(model, folded=1)


def test_same_padding_of_a_3x3_kernel_keeps_the_bn() -> None:
    model = bn_then([], "Conv", shape=["N", C, 6, 6], auto_pad="SAME_LOWER")
    assert kept_reason(model).endswith("backward: the Conv zero-pads its input")


def test_zero_padding_conv_keeps_the_bn() -> None:
    reason = kept_reason(bn_then([], "Conv", shape=["N", C, 6, 6], pads=[1, 1, 1, 1]))
    assert reason.endswith("backward: the Conv zero-pads its input")


@pytest.mark.parametrize("mode", ["edge", "reflect"])
def test_value_copying_pad_between_is_crossed(mode: str) -> None:
    """torch's replicate/reflect padding exports as Pad(edge/reflect) + an unpadded Conv."""
    pads = initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    model = bn_then(
        [("Pad", {"mode": mode}, ["pads"])], "Conv", shape=["N", C, 6, 6], extra_inits=[pads]
    )
    folded, _ = check_fold(model, folded=1)
    assert op_counts(folded.graph) == {"Relu": 1, "Pad": 1, "Conv": 1}


def test_pad_with_computed_pads_is_crossed() -> None:
    """Pads computed from constants (the torch exporter's Concat/Slice chains) count as constant."""
    half = initializer("half", np.array([0, 0, 1, 1], np.int64))
    model = bn_then([], "Conv", shape=["N", C, 6, 6], extra_inits=[half])
    model.graph.node.insert(
        0, helper.make_node("Concat", ["half", "half"], ["pads"], name="concat", axis=0)
    )
    bn_output_reader = model.graph.node[-1]
    model.graph.node.insert(
        len(model.graph.node) - 1,
        helper.make_node("Pad", ["n", "pads"], ["padded"], name="pad", mode="edge"),
    )
    bn_output_reader.input[0] = "padded"
    check_fold(model, folded=1)


def test_constant_pad_keeps_the_bn() -> None:
    pads = initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    model = bn_then(
        [("Pad", {"mode": "constant"}, ["pads"])], "Conv", shape=["N", C, 6, 6], extra_inits=[pads]
    )
    assert kept_reason(model).endswith(
        "backward: Pad in constant mode adds values the BN never saw"
    )


def test_pad_on_the_channel_axis_keeps_the_bn() -> None:
    pads = initializer("pads", np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64))
    model = bn_then(
        [("Pad", {"mode": "edge"}, ["pads"])],
        "Conv",
        shape=["N", C, 6, 6],
        extra_inits=[pads],
        layer_channels=C + 1,
    )
    assert kept_reason(model).endswith("backward: Pad pads the batch or channel axis")


def test_dropout_between_bn_and_gemm() -> None:
    folded, _ = check_fold(
        bn_then([("Dropout", {}, []), ("Identity", {}, [])], "Gemm", shape=["N", C]), folded=1
    )
    assert op_counts(folded.graph) == {"Relu": 1, "Dropout": 1, "Identity": 1, "Gemm": 1}


def test_dropout_in_training_mode_keeps_the_bn() -> None:
    training = initializer("training", np.array(True))
    ratio = initializer("ratio", np.array(0.0, np.float32))  # ratio 0: still deterministic
    model = bn_then(
        [("Dropout", {}, ["ratio", "training"])],
        "Gemm",
        shape=["N", C],
        extra_inits=[training, ratio],
    )
    assert kept_reason(model).endswith("backward: Dropout may run in training mode")


def test_gemm_alpha_beta_and_trans_b_in_the_backward_fold() -> None:
    check_fold(bn_then([], "Gemm", shape=["N", C], alpha=0.5, beta=2.0, transB=1), folded=1)


def test_gemm_reading_the_bn_transposed_keeps_it() -> None:
    model = bn_then([], "Gemm", shape=[C, C], transA=1)
    assert kept_reason(model).endswith("backward: channel axis does not line up")


def test_matmul_reading_a_2d_bn_becomes_gemm() -> None:
    folded, _ = check_fold(bn_then([], "MatMul", shape=["N", C]), folded=1)
    assert op_counts(folded.graph) == {"Relu": 1, "Gemm": 1}


def test_flatten_spreads_each_channel_over_its_spatial_block() -> None:
    model = bn_then(
        [("Flatten", {"axis": 1}, [])], "Gemm", shape=["N", C, 2, 3], layer_channels=C * 6
    )
    check_fold(model, folded=1)


def test_reshape_to_channel_blocks_is_crossed() -> None:
    shape = initializer("shape", np.array([0, -1], np.int64))
    model = bn_then(
        [("Reshape", {}, ["shape"])],
        "MatMul",
        shape=["N", C, 2, 3],
        layer_channels=C * 6,
        extra_inits=[shape],
    )
    check_fold(model, folded=1)


def test_reshape_that_mixes_channels_keeps_the_bn() -> None:
    shape = initializer("shape", np.array([-1, 6], np.int64))
    model = bn_then(
        [("Reshape", {}, ["shape"])],
        "MatMul",
        shape=[2, C, 3],
        layer_channels=6,
        extra_inits=[shape],
    )
    assert kept_reason(model).endswith(
        "backward: the Reshape does not provably keep each channel's values together"
    )


def test_flatten_with_unknown_spatial_size_keeps_the_bn() -> None:
    model = bn_then(
        [("Flatten", {"axis": 1}, [])], "Gemm", shape=["N", C, "H", 3], layer_channels=C * 9
    )
    assert kept_reason(model).endswith("backward: the spatial size before Flatten is not static")


def test_rank3_bn_transposed_into_matmul() -> None:
    """BatchNorm1d over (N, C, L), then (N, L, C) @ W: the MatMul features are the channels."""
    model = bn_then([("Transpose", {"perm": [0, 2, 1]}, [])], "MatMul", shape=["N", C, 5])
    folded, _ = check_fold(model, folded=1)
    assert op_counts(folded.graph) == {"Relu": 1, "Transpose": 1, "MatMul": 1, "Add": 1}


def test_rank3_bn_straight_into_matmul_keeps_it() -> None:
    model = bn_then([], "MatMul", shape=["N", C, 4], layer_channels=4)
    assert kept_reason(model).endswith("backward: channel axis does not line up")


def test_nonlinear_node_between_keeps_the_bn() -> None:
    model = bn_then([("Sigmoid", {}, [])], "Gemm", shape=["N", C])
    assert kept_reason(model).endswith(
        "backward: the BN output feeds Sigmoid, not Conv/Gemm/MatMul"
    )


def test_bn_output_read_twice_keeps_the_bn() -> None:
    model = bn_then([], "Gemm", shape=["N", C])
    model.graph.node.append(helper.make_node("Neg", ["n"], ["side"], name="side"))
    add_output(model, "side")
    assert kept_reason(model).endswith("backward: the BN output also feeds 1 other node(s)")


def test_bn_output_as_graph_output_keeps_the_bn() -> None:
    model = bn_then([], "Gemm", shape=["N", C])
    add_output(model, "n")
    assert kept_reason(model).endswith("backward: the BN output is a graph output")


def test_conv_transpose_is_not_a_backward_target() -> None:
    model = bn_then([], "ConvTranspose", shape=["N", C, 5, 5])
    assert kept_reason(model).endswith(
        "backward: the BN output feeds ConvTranspose, not Conv/Gemm/MatMul"
    )


def test_forward_and_backward_folds_into_the_same_conv() -> None:
    """BN1 ─► Conv ─► BN2: BN2 folds forward, then BN1 backward, into one conv."""
    model = bn_then([], "Conv", shape=["N", C, 6, 6])
    model.graph.initializer.extend(bn_initializers("bn2", 4, seed=20))
    model.graph.node[-1].output[0] = "c"
    model.graph.node.append(bn_node("c", "Y", "bn2"))
    folded, report = check_fold(model, folded=2)
    assert {(item.name, item.direction) for item in report.folded} == {
        ("bn", "backward"),
        ("bn2", "forward"),
    }
    assert op_counts(folded.graph) == {"Relu": 1, "Conv": 1}


def test_two_chained_bns_before_a_conv_both_fold_backward() -> None:
    """BN ─► BN ─► Conv: the second folds first, then the first reaches the conv."""
    model = bn_then([], "Conv", shape=["N", C, 6, 6])
    model.graph.initializer.extend(bn_initializers("bn0", C, seed=30))
    model.graph.node.insert(1, bn_node("r", "r0", "bn0"))
    model.graph.node[2].input[0] = "r0"
    folded, report = check_fold(model, folded=2)
    assert {item.direction for item in report.folded} == {"backward"}
    assert op_counts(folded.graph) == {"Relu": 1, "Conv": 1}


# ---- a DAG of value-copying nodes: torch's circular padding ------------------------------


def slice_node(x: str, y: str, axis: int, start: int, end: int) -> list:
    """Slice one axis with Constant starts/ends/axes, as the torch exporter writes it."""
    constants = {"starts": start, "ends": end, "axes": axis}
    nodes = [
        helper.make_node(
            "Constant",
            [],
            [f"{y}.{part}"],
            name=f"{y}.{part}",
            value=helper.make_tensor(f"{y}.{part}", TensorProto.INT64, [1], [value]),
        )
        for part, value in constants.items()
    ]
    inputs = [x, *(f"{y}.{part}" for part in constants)]
    return [*nodes, helper.make_node("Slice", inputs, [y], name=y)]


def circular_pad(x: str, y: str, axis: int, width: int = 1) -> list:
    """torch's export of circular padding on one axis: Concat(x[-width:], x, x[:width])."""
    return [
        *slice_node(x, f"{y}.tail", axis, -width, 2**62),
        *slice_node(x, f"{y}.head", axis, 0, width),
        helper.make_node("Concat", [f"{y}.tail", x, f"{y}.head"], [y], name=y, axis=axis),
    ]


def bn_region_then_conv(
    between: list,
    conv_input: str,
    *,
    conv_channels: int = C,
    kernel: tuple[int, int] = (3, 3),
    extra_inputs: tuple = (),
):
    """X ─► Relu ─► BN ─► n ─► [between: any DAG] ─► Conv(conv_input; no padding) ─► Y"""
    inits = [
        *bn_initializers("bn", C),
        initializer("W", array(5, 4, conv_channels, *kernel)),
        initializer("b", array(6, 4)),
    ]
    nodes = [
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        bn_node("r", "n", "bn"),
        *between,
        helper.make_node("Conv", [conv_input, "W", "b"], ["Y"], name="layer"),
    ]
    return make_model(nodes, [("X", ["N", C, 6, 6]), *extra_inputs], ["Y"], inits)


def test_circular_padding_slices_and_concats_are_crossed() -> None:
    """Conv2d(padding_mode="circular") exports as Slice/Concat per axis, then an unpadded Conv."""
    model = bn_region_then_conv([*circular_pad("n", "p2", 2), *circular_pad("p2", "p3", 3)], "p3")
    folded, report = check_fold(model, folded=1)
    assert report.folded[0].direction == "backward" and report.folded[0].into == "layer"
    assert op_counts(folded.graph) == {
        "Relu": 1,
        "Constant": 12,
        "Slice": 4,
        "Concat": 2,
        "Conv": 1,
    }


def test_circular_padding_of_a_wide_kernel_is_crossed() -> None:
    """Two columns each side, on the last axis only (a 1×5 kernel's circular padding)."""
    model = bn_region_then_conv(circular_pad("n", "p3", 3, width=2), "p3", kernel=(1, 5))
    check_fold(model, folded=1)


def test_concat_with_values_from_elsewhere_keeps_the_bn() -> None:
    model = bn_region_then_conv(
        [helper.make_node("Concat", ["n", "Z"], ["joined"], name="join", axis=2)],
        "joined",
        extra_inputs=(("Z", ["N", C, 2, 6]),),
    )
    assert kept_reason(model).endswith(
        "backward: Concat joins the BN's values with values that did not go through it"
    )


def test_concat_along_the_channel_axis_keeps_the_bn() -> None:
    model = bn_region_then_conv(
        [helper.make_node("Concat", ["n", "n"], ["joined"], name="join", axis=1)],
        "joined",
        conv_channels=2 * C,
    )
    assert kept_reason(model).endswith("backward: Concat joins along the batch or channel axis")


def test_slice_of_the_channel_axis_keeps_the_bn() -> None:
    model = bn_region_then_conv(slice_node("n", "half", 1, 0, 2), "half", conv_channels=2)
    assert kept_reason(model).endswith("backward: Slice cuts the batch or channel axis")


def test_bn_values_reaching_two_layers_keep_the_bn() -> None:
    """Each Slice feeds its own Conv: one fold cannot serve both."""
    model = bn_region_then_conv(
        [*slice_node("n", "top", 2, 0, 3), *slice_node("n", "bottom", 2, 3, 6)], "top"
    )
    model.graph.node.append(helper.make_node("Conv", ["bottom", "W", "b"], ["Y2"], name="other"))
    add_output(model, "Y2")
    assert kept_reason(model).endswith("backward: the BN's values reach more than one layer")
