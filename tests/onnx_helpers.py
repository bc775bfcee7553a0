"""Helpers for the ONNX-path tests: tiny graphs built with onnx.helper, folds, exports.

Every graph gets BN parameters far from the defaults (γ≠1, β≠0, μ≠0, σ²≠1),
so each term of the fold formula matters, and is checked against onnxruntime
running the original graph with its optimizer off (onnxruntime would
otherwise fuse Conv+BN itself and compare us with its own fold).

Tolerance for the fold checks: rtol 1e-5, atol 1e-5. Outputs are sums of up
to ~100 products of O(1) values; float32 rounds each with error ~6e-8 of the
sum of the products' magnitudes (~10-50), so a correct fold can move an
output that cancels to ~0 by a few 1e-6 in absolute terms (seen: 4e-6 on a
3-D conv), while a wrong fold (a dropped shift, a scale on the wrong axis)
moves outputs by O(0.1). rtol is ten times tighter than the converter's own
verification rule (1e-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from torch import nn

from bnfold.convert.onnx.fold import fold_batchnorms
from bnfold.convert.onnx.graph import infer_tensor_info, name_nodes_uniquely, op_counts
from bnfold.convert.report import BatchNormReport

FOLD_RTOL = 1e-5
FOLD_ATOL = 1e-5
LATEST_OPSET = onnx.defs.onnx_opset_version()


def array(seed: int, *shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def initializer(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def bn_initializers(prefix: str, channels: int, seed: int = 0) -> list[TensorProto]:
    """scale, bias, mean, var for one BN, named `<prefix>.scale` etc."""
    return [
        initializer(f"{prefix}.scale", array(seed, channels, low=0.5, high=2.0)),
        initializer(f"{prefix}.bias", array(seed + 1, channels)),
        initializer(f"{prefix}.mean", array(seed + 2, channels)),
        initializer(f"{prefix}.var", array(seed + 3, channels, low=0.5, high=2.0)),
    ]


def bn_node(x: str, y: str, prefix: str, *, name: str | None = None, **attrs: object) -> NodeProto:
    inputs = [x, *(f"{prefix}.{part}" for part in ("scale", "bias", "mean", "var"))]
    return helper.make_node(
        "BatchNormalization", inputs, [y], name=name or prefix, epsilon=1e-3, **attrs
    )


def make_model(
    nodes: Sequence[NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str],
    initializers: Sequence[TensorProto],
    *,
    opset: int = 17,
) -> ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    # Shape inference fills in the output shapes the checker wants.
    model = onnx.shape_inference.infer_shapes(model)
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def add_output(model: ModelProto, name: str) -> None:
    """Expose tensor `name` as a graph output, typed and shaped by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {value.name: value for value in [*inferred.graph.value_info, *inferred.graph.output]}
    model.graph.output.append(known[name])


def list_as_input(model: ModelProto, name: str, *, keep_initializer: bool) -> ModelProto:
    """List initializer `name` among the graph inputs of `model` (changed in place, returned).

    Kept as an initializer too, it is an overridable default (IR ≥ 4); removed, a plain
    input: either way its value is no longer a constant.
    """
    tensor = next(t for t in model.graph.initializer if t.name == name)
    if not keep_initializer:
        model.graph.initializer.remove(tensor)
    model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
    return model


def named_copies(model: ModelProto) -> tuple[ModelProto, ModelProto]:
    """A copy of `model` with its nodes named as the pipeline names them, and a second copy
    of that one for a pass to rewrite; `model` itself stays as it is."""
    original = ModelProto()
    original.CopyFrom(model)
    name_nodes_uniquely(original.graph)
    rewritten = ModelProto()
    rewritten.CopyFrom(original)
    return original, rewritten


def fold(model: ModelProto) -> tuple[ModelProto, BatchNormReport]:
    """Fold a copy of `model` the way the pipeline does (named nodes, inferred shapes)."""
    original, folded = named_copies(model)
    report = fold_batchnorms(folded, infer_tensor_info(original))
    onnx.checker.check_model(folded, full_check=True)
    return folded, report


def run(model: ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def random_feed(model: ModelProto, seed: int = 11) -> dict[str, np.ndarray]:
    """Every required input; initializers listed as inputs keep their defaults."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    feed = {}
    for position, value in enumerate(model.graph.input):
        if value.name in initializers:
            continue
        dims = [dim.dim_value or 3 for dim in value.type.tensor_type.shape.dim]
        feed[value.name] = (
            np.random.default_rng(seed + position).standard_normal(dims).astype(np.float32)
        )
    return feed


def assert_same_outputs(original: ModelProto, folded: ModelProto) -> None:
    feed = random_feed(original)
    for got, want in zip(run(folded, feed), run(original, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=FOLD_RTOL, atol=FOLD_ATOL)


def check_fold(
    model: ModelProto, *, folded: int, kept: int = 0
) -> tuple[ModelProto, BatchNormReport]:
    """Fold, then check the report's counts, the BN nodes left and the numbers."""
    result, report = fold(model)
    assert len(report.folded) == folded, report
    assert len(report.kept) == kept, report
    assert op_counts(result.graph).get("BatchNormalization", 0) == kept
    assert_same_outputs(model, result)
    return result, report


def kept_reason(model: ModelProto) -> str:
    """The one BN of `model` must be kept, the graph unchanged in numbers; its reason."""
    _result, report = check_fold(model, folded=0, kept=1)
    return report.kept[0].reason


def export(module: nn.Module, path: Path, shape: tuple[int, ...], *, dynamic: bool = True) -> Path:
    """Export the plain way (TorchScript, no constant folding): every BN node stays."""
    torch.onnx.export(
        module,
        (torch.randn(*shape),),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None,
        opset_version=17,
    )
    return path


def save_with_external_data(source: Path, target: Path) -> Path:
    """Save the model at `source` again as `target`, every tensor in one side file
    `<target name>.data` beside it (no size threshold: small tensors go there too)."""
    onnx.save_model(
        onnx.load(str(source)),
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data",
        size_threshold=0,
    )
    return target
