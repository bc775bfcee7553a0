"""Forward fold into Conv/ConvTranspose, and the guards that keep a BN, on onnx.helper graphs."""

from __future__ import annotations

import pytest
from onnx import helper, numpy_helper

from bnfold.convert.onnx.graph import op_counts
from bnfold.convert.report import BatchNormReport

from onnx_helpers import (
    LATEST_OPSET,
    add_output,
    array,
    assert_same_outputs,
    bn_initializers,
    bn_node,
    check_fold,
    initializer,
    kept_reason,
    list_as_input,
    make_model,
)


def conv_bn(
    *,
    op: str = "Conv",
    groups: int = 1,
    bias: bool = True,
    spatial: int = 2,
    opset: int = 17,
    in_channels: int = 4,
    out_channels: int = 6,
):
    """X ─► Conv/ConvTranspose(W[, b]) ─► BN ─► Y"""
    kernel = [3] * spatial
    if op == "Conv":
        weight_shape = [out_channels, in_channels // groups, *kernel]
    else:
        weight_shape = [in_channels, out_channels // groups, *kernel]
    inits = [initializer("W", array(1, *weight_shape)), *bn_initializers("bn", out_channels)]
    conv_inputs = ["X", "W"]
    if bias:
        inits.append(initializer("b", array(2, out_channels)))
        conv_inputs.append("b")
    nodes = [
        helper.make_node(op, conv_inputs, ["c"], name="conv", group=groups, pads=[1] * 2 * spatial),
        bn_node("c", "Y", "bn"),
    ]
    shape = ["N", in_channels, *([5] * spatial)]
    return make_model(nodes, [("X", shape)], ["Y"], inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 13, 14, 15, LATEST_OPSET])
def test_conv_bn_folds_in_every_opset(opset: int) -> None:
    folded, report = check_fold(conv_bn(opset=opset), folded=1)
    assert report.folded[0].into == "conv" and report.folded[0].direction == "forward"
    assert op_counts(folded.graph) == {"Conv": 1}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_conv_and_conv_transpose_any_groups_with_or_without_bias(
    op: str, groups: int, bias: bool
) -> None:
    check_fold(conv_bn(op=op, groups=groups, bias=bias), folded=1)


@pytest.mark.parametrize("spatial", [1, 3])
def test_conv1d_and_conv3d(spatial: int) -> None:
    check_fold(conv_bn(spatial=spatial), folded=1)


def test_depthwise_conv() -> None:
    check_fold(conv_bn(groups=4, in_channels=4, out_channels=8), folded=1)


def test_conv_transpose_depthwise() -> None:
    check_fold(conv_bn(op="ConvTranspose", groups=4, in_channels=4, out_channels=4), folded=1)


def test_conv_output_with_another_consumer_keeps_the_bn() -> None:
    model = conv_bn()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["side"], name="side"))
    add_output(model, "side")
    assert "the Conv output also feeds 1 other node(s)" in kept_reason(model)


def test_conv_output_that_is_a_graph_output_keeps_the_bn() -> None:
    model = conv_bn()
    add_output(model, "c")
    assert "the Conv output is a graph output" in kept_reason(model)


def test_non_constant_conv_weight_keeps_the_bn() -> None:
    model = list_as_input(conv_bn(), "W", keep_initializer=False)
    assert kept_reason(model).startswith("forward: Conv weight is not constant;")


def test_non_constant_bn_parameters_keep_the_bn() -> None:
    model = list_as_input(conv_bn(), "bn.scale", keep_initializer=False)
    assert kept_reason(model) == "BN parameters are not constant initializers"


def test_training_mode_keeps_the_bn() -> None:
    model = conv_bn(opset=15)
    bn = model.graph.node[-1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    assert kept_reason(model) == "training_mode=1: the BN normalises with batch statistics"


def test_running_statistics_outputs_before_opset_14_mean_training_mode() -> None:
    """Opsets 9-13 have no training_mode: extra outputs make the BN a training-mode BN."""
    model = conv_bn(opset=9)
    model.graph.node[-1].output.extend(["mean_out", "var_out", "saved_mean", "saved_var"])
    assert kept_reason(model) == (
        "it has running-statistics outputs, which before opset 14 means training mode"
    )


def test_shared_weight_is_copied_not_changed() -> None:
    """Two convs share W; folding the BN of one must leave the other's output unchanged."""
    model = conv_bn()
    model.graph.node.append(
        helper.make_node("Conv", ["X", "W", "b"], ["other"], name="other", pads=[1, 1, 1, 1])
    )
    add_output(model, "other")
    folded, _report = check_fold(model, folded=1)
    initializer_names = {t.name for t in folded.graph.initializer}
    assert "W" in initializer_names  # still read by the other conv
    other = next(node for node in folded.graph.node if node.name == "other")
    assert list(other.input) == ["X", "W", "b"]


def test_bn_parameters_behind_identity_are_constant() -> None:
    """The torch exporter routes deduplicated BN parameters through Identity nodes."""
    model = conv_bn()
    bn = model.graph.node[-1]
    model.graph.node.insert(0, helper.make_node("Identity", ["bn.var"], ["var_alias"], name="i"))
    bn.input[4] = "var_alias"
    folded, _ = check_fold(model, folded=1)
    assert op_counts(folded.graph) == {"Conv": 1}  # the orphaned Identity went too


def test_two_chained_bns_both_fold_into_the_conv() -> None:
    """Conv ─► BN ─► BN: once the first is folded the second reads the conv; a second round."""
    model = conv_bn()
    model.graph.initializer.extend(bn_initializers("bn2", 6, seed=9))
    model.graph.node.append(bn_node("Y", "Z", "bn2"))
    model.graph.output[0].name = "Z"
    folded, report = check_fold(model, folded=2)
    assert [(item.name, item.into) for item in report.folded] == [("bn", "conv"), ("bn2", "conv")]
    assert op_counts(folded.graph) == {"Conv": 1}


def test_unnamed_nodes_get_stable_layer_names() -> None:
    model = conv_bn()
    for node in model.graph.node:
        node.name = ""
    _folded, report = check_fold(model, folded=1)
    assert report.folded[0].name == "BatchNormalization_1"
    assert report.folded[0].into == "Conv_0"


def test_assert_same_outputs_catches_a_wrong_fold() -> None:
    """The numeric check used everywhere here is sharp enough to see a dropped shift."""
    model = conv_bn()
    wrong = conv_bn()
    del wrong.graph.node[-1]
    wrong.graph.node[-1].output[0] = "Y"
    with pytest.raises(AssertionError):
        assert_same_outputs(model, wrong)


# ---- overridable initializers, and BNs without running statistics ------------------------


def kept_as_overridable(name: str) -> BatchNormReport:
    """conv_bn() with initializer `name` also listed in graph.input: the BN must be kept, and
    `name` must stay both an input and an initializer (a default a caller may override)."""
    model = list_as_input(conv_bn(), name, keep_initializer=True)
    folded, report = check_fold(model, folded=0, kept=1)
    assert name in {value.name for value in folded.graph.input}
    assert name in {tensor.name for tensor in folded.graph.initializer}
    return report


def test_overridable_bn_parameter_keeps_the_bn_and_the_input() -> None:
    report = kept_as_overridable("bn.var")
    assert report.kept[0].reason.startswith(
        "BN parameters bn.var are overridable graph inputs (initializers also listed in "
        "graph.input), so they are not constant;"
    )
    assert report.layers == []  # its running variance is not a constant either


def test_overridable_conv_weight_keeps_the_bn_and_the_input() -> None:
    report = kept_as_overridable("W")
    assert report.kept[0].reason.startswith(
        "forward: Conv weight 'W' is an overridable graph input (an initializer also listed "
        "in graph.input), so it is not a constant;"
    )
    assert [layer.name for layer in report.layers] == ["bn"]


def test_before_ir_4_initializers_listed_as_inputs_are_constants() -> None:
    """IR 3 requires every initializer among the inputs: they fold, and new ones are listed too."""
    model = conv_bn(opset=9)
    for tensor in list(model.graph.initializer):
        list_as_input(model, tensor.name, keep_initializer=True)
    model.ir_version = 3
    folded, _report = check_fold(model, folded=1)
    inputs = {value.name for value in folded.graph.input}
    assert {tensor.name for tensor in folded.graph.initializer} <= inputs
    assert not {"W", "bn.scale", "bn.mean"} & inputs  # folded away, inputs with them


def test_running_statistics_as_graph_inputs_keep_the_bn_out_of_the_layers() -> None:
    model = conv_bn()
    for name in ("bn.mean", "bn.var"):
        list_as_input(model, name, keep_initializer=False)
    _folded, report = check_fold(model, folded=0, kept=1)
    assert report.kept[0].reason == (
        "BN parameters are not constant initializers; its running mean or variance is not "
        "constant (no running statistics), so it is not in batchnorm.layers (compare skips it)"
    )
    assert report.layers == []


def test_negative_running_variance_keeps_the_bn_out_of_the_layers() -> None:
    model = conv_bn()
    var = next(t for t in model.graph.initializer if t.name == "bn.var")
    values = numpy_helper.to_array(var).copy()
    values[2] = -1.0
    var.CopyFrom(numpy_helper.from_array(values, "bn.var"))
    _folded, report = check_fold(model, folded=0, kept=1)
    assert report.kept[0].reason == (
        "its running variance is negative, so it is not in batchnorm.layers (compare skips it)"
    )
    assert report.layers == []
