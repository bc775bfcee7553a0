"""train.onnx from an ONNX graph, against torch's train mode and the numpy train reference.

Tolerances: the train graph normalises with statistics of the batch itself,
so outputs are O(1) whatever the inputs; float32 mean/variance over a few
hundred values differ from float64 (or from torch's own kernels) by ~1e-6
relative. rtol 1e-5 / atol 1e-5 leaves an order of magnitude of room while a
wrong axis list, an unbiased variance (a factor n/(n-1) ≥ 1.006 here) or a
missing ε would all fail it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper
from torch import nn

from bnfold.convert.onnx.graph import infer_tensor_info, op_counts
from bnfold.convert.onnx.reference import TrainReference
from bnfold.convert.onnx.train_graph import build_train_graph

from onnx_helpers import (
    array,
    bn_initializers,
    bn_node,
    export,
    initializer,
    list_as_input,
    make_model,
    named_copies,
)

TRAIN_RTOL = 1e-5
TRAIN_ATOL = 1e-5


def conv_relu_bn_gemm(opset: int):
    """X ─► Conv ─► BN(a) ─► Relu ─► Flatten ─► BN(b, 2-D) ─► Dropout ─► Gemm ─► Y"""
    inits = [
        initializer("W", array(1, 3, 2, 3, 3)),
        *bn_initializers("a", 3),
        *bn_initializers("b", 3 * 4 * 4, seed=5),
        initializer("G", array(2, 5, 48)),
        initializer("g", np.zeros(5, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
        bn_node("c", "n1", "a"),
        helper.make_node("Relu", ["n1"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        bn_node("f", "n2", "b"),
        helper.make_node("Dropout", ["n2"], ["d"], name="dropout"),
        helper.make_node("Gemm", ["d", "G", "g"], ["Y"], name="gemm", transB=1),
    ]
    return make_model(nodes, [("X", ["N", 2, 6, 6])], ["Y"], inits, opset=opset)


def train_graph(model: ModelProto) -> tuple[ModelProto, list[str], ModelProto]:
    original, train = named_copies(model)
    stat_names = build_train_graph(train, infer_tensor_info(original))
    onnx.checker.check_model(train, full_check=True)
    return train, stat_names, original


def run(model: ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def numpy_train_mode(x: np.ndarray, prefix: str, model: ModelProto) -> np.ndarray:
    """A BN with batch statistics, written out by hand from the ONNX spec."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    axes = (0, *range(2, x.ndim))
    shape = (-1,) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    scale, bias = values[f"{prefix}.scale"].reshape(shape), values[f"{prefix}.bias"].reshape(shape)
    return (x - mean) / np.sqrt(var + 1e-3) * scale + bias


@pytest.mark.parametrize("opset", [9, 17, 18, onnx.defs.onnx_opset_version()])
def test_train_graph_outputs_and_statistics(opset: int) -> None:
    """ReduceMean's axes are an attribute before opset 18 and an input from 18 on."""
    model = conv_relu_bn_gemm(opset)
    train, stat_names, original = train_graph(model)
    assert stat_names == ["a.batch_mean", "a.batch_var", "b.batch_mean", "b.batch_var"]
    assert [output.name for output in train.graph.output] == ["Y", *stat_names]
    assert "BatchNormalization" not in op_counts(train.graph)
    assert op_counts(train.graph)["Dropout"] == 1  # eval behaviour: left in place

    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6)).astype(np.float32)
    y, mean_a, var_a, mean_b, var_b = run(train, {"X": x})

    # The same network by hand: conv (ORT, no BN involved), then numpy BNs.
    conv_only = make_model(
        [helper.make_node("Conv", ["X", "W"], ["c"], name="conv")],
        [("X", ["N", 2, 6, 6])],
        ["c"],
        [t for t in model.graph.initializer if t.name == "W"],
    )
    c = run(conv_only, {"X": x})[0].astype(np.float64)
    n1 = numpy_train_mode(c, "a", original)
    flat = np.maximum(n1, 0).reshape(4, -1)
    n2 = numpy_train_mode(flat, "b", original)
    gemm_weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "G"))
    np.testing.assert_allclose(y, n2 @ gemm_weight.T, rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    np.testing.assert_allclose(mean_a, c.mean(axis=(0, 2, 3)), rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    np.testing.assert_allclose(var_a, c.var(axis=(0, 2, 3)), rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    np.testing.assert_allclose(mean_b, flat.mean(axis=0), rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    np.testing.assert_allclose(var_b, flat.var(axis=0), rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    assert mean_a.shape == (3,) and mean_a.dtype == np.float32


def test_train_reference_agrees_with_the_train_graph() -> None:
    """The verification's reference (original nodes + numpy BNs) and train.onnx agree."""
    model = conv_relu_bn_gemm(17)
    train, _stat_names, original = train_graph(model)
    x = np.random.default_rng(1).standard_normal((5, 2, 6, 6)).astype(np.float32)
    with TrainReference(original, infer_tensor_info(original)) as reference:
        expected = reference.run({"X": x})
    actual = run(train, {"X": x})
    for got, want in zip(actual, [*expected.outputs, *expected.statistics], strict=True):
        np.testing.assert_allclose(got, want, rtol=TRAIN_RTOL, atol=TRAIN_ATOL)


def test_double_model_statistics_are_float32() -> None:
    inits = [
        numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)
        for t in bn_initializers("bn", 3)
    ]
    graph = helper.make_graph(
        [bn_node("X", "Y", "bn")],
        "double",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    train, _, _ = train_graph(model)
    x = np.random.default_rng(2).standard_normal((6, 3))
    y, mean, var = run(train, {"X": x})
    assert y.dtype == np.float64 and mean.dtype == np.float32 and var.dtype == np.float32
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-6)


class SmallNet(nn.Module):
    """Conv-BN, BN before a padding-free conv, BatchNorm1d after Linear and before Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 8)
        self.bn3 = nn.BatchNorm1d(8)
        self.bn4 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.bn2(torch.relu(self.bn1(self.conv(x)))))
        x = torch.relu(self.bn3(self.fc(torch.flatten(x, 1))))
        return self.head(self.bn4(x))


def test_train_graph_matches_torch_train_mode(tmp_path) -> None:
    torch.manual_seed(0)
    module = SmallNet()
    with torch.no_grad():
        for bn in (module.bn1, module.bn2, module.bn3, module.bn4):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    module.eval()
    model = onnx.load(str(export(module, tmp_path / "net.onnx", (2, 2, 5, 5))))
    assert op_counts(model.graph)["BatchNormalization"] == 4
    train, stat_names, _ = train_graph(model)
    assert len(stat_names) == 8

    x = np.random.default_rng(3).standard_normal((6, 2, 5, 5)).astype(np.float32)
    captured: list[np.ndarray] = []

    def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        values = inputs[0].detach().double()
        dims = [0, *range(2, values.dim())]
        captured.extend(
            [values.mean(dim=dims).numpy(), values.var(dim=dims, unbiased=False).numpy()]
        )

    for bn in (module.bn1, module.bn2, module.bn3, module.bn4):
        bn.train()
        bn.register_forward_pre_hook(record)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    actual = run(train, {"input": x})
    np.testing.assert_allclose(actual[0], expected, rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
    for got, want in zip(actual[1:], captured, strict=True):
        np.testing.assert_allclose(got, want, rtol=TRAIN_RTOL, atol=TRAIN_ATOL)


def test_bn_without_running_statistics_normalises_but_has_no_statistics_outputs() -> None:
    """BN(a)'s mean/var are graph inputs: no manifest layer, so no outputs; BN(b) keeps its pair.

    Both still normalise with batch statistics, and the train reference agrees on both.
    """
    model = conv_relu_bn_gemm(17)
    for name in ("a.mean", "a.var"):
        list_as_input(model, name, keep_initializer=False)
    train, stat_names, original = train_graph(model)
    assert stat_names == ["b.batch_mean", "b.batch_var"]
    assert [output.name for output in train.graph.output] == ["Y", *stat_names]
    assert "BatchNormalization" not in op_counts(train.graph)
    feed = {
        "X": np.random.default_rng(4).standard_normal((5, 2, 6, 6)).astype(np.float32),
        "a.mean": np.zeros(3, np.float32),
        "a.var": np.ones(3, np.float32),
    }
    with TrainReference(original, infer_tensor_info(original)) as reference:
        expected = reference.run(feed)
    assert len(expected.statistics) == 2
    actual = run(train, feed)
    for got, want in zip(actual, [*expected.outputs, *expected.statistics], strict=True):
        np.testing.assert_allclose(got, want, rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
