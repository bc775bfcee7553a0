"""The ONNX path folds what the torch path folds, model by model.

Every model of the torch pattern suite (`torch_pattern_suite` in
tests/test_convert_patterns.py) is exported the plain way (`export` in
tests/onnx_helpers.py): TorchScript, `do_constant_folding=False`, eval
mode (the exporter's default, TrainingMode.EVAL), opset 17, a dynamic batch
axis. Each BN call then stays a BatchNormalization node: the exporter fuses
none of them (checked by count below, so an exporter that did would fail
here, not shrink the comparison). That file goes through `convert_onnx_file`,
and its report must agree with the torch fold plan for the same model, BN by
BN: the same BNs folded, each in the same direction, into the same kind of
layer.

BNs are matched by order, not by name: torch names a BN after its module path
(`1`, `stem.bn`; a functional call after its running mean), the exporter after
its scope (`/1/BatchNormalization`, `/BatchNormalization` for a functional
call, abbreviated for nested modules). Both list BN calls in execution order:
the fx graph, and the exporter's node order. The i-th site of the torch plan is
the i-th BatchNormalization node of the export.

Two exceptions, each accounted for rather than skipped:

* a BatchNorm module with track_running_stats=False cannot be exported with a
  dynamic batch axis (the exporter needs N to write the batch-statistics BN),
  so those models are exported at their fixed example batch;
* `ONNX_ONLY_FOLDS`: the ONNX path folds strictly more in two cases.

The package must also compute what the torch model computes (the conversion
verifies that already; here on a batch neither conversion saw, by the
converter's float32 rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_convert_patterns import torch_pattern_suite
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.onnx.graph import name_nodes_uniquely
from bnfold.convert.onnx.pipeline import convert_onnx_file
from bnfold.convert.torch.graph import CONV_TRANSPOSE_TYPES, CONV_TYPES, FoldPlan, plan_folds
from bnfold.convert.torch.pipeline import trace

from convert_helpers import run_onnx, torch_eval, within_float32_tolerance
from onnx_helpers import export

#: Cases where the ONNX path folds a BN the torch path keeps, and why both are right.
ONNX_ONLY_FOLDS = {
    "kept-layer-applied-twice": (
        "the Linear is applied twice; torch folds by rewriting the module's parameters, which "
        "both applications share, so it keeps the BN. The export has two Gemm nodes reading "
        "one initializer, and the ONNX fold writes the folded weights to fresh initializers "
        "for the one Gemm it rewrites; the other keeps the originals: exact"
    ),
    "kept-tied-weights": (
        "the two Linears tie one weight; torch keeps a BN whose layer ties parameters with "
        "another module. In the export both Gemms read one initializer, and the ONNX fold "
        "copies it for the Gemm it rewrites: exact"
    ),
}

#: The kind of layer a fold went into, in the torch path's terms.
ONNX_LAYER_KINDS = {
    "Conv": "Conv",
    "ConvTranspose": "ConvTranspose",
    "Gemm": "Linear",
    "MatMul": "Linear",
}
FRESH_BATCH = 5


def torch_layer_kind(module: nn.Module) -> str:
    if isinstance(module, CONV_TYPES):
        return "Conv"
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        return "ConvTranspose"
    assert isinstance(module, nn.Linear), module
    return "Linear"


def has_batch_statistics_module(model: nn.Module) -> bool:
    return any(
        isinstance(module, _BatchNorm) and not module.track_running_stats
        for module in model.modules()
    )


def exported_batchnorms(path: Path) -> tuple[list[str], dict[str, str]]:
    """The BatchNormalization node names in graph order, and every node's op type by name,
    named as `load_onnx_source` names them."""
    graph = onnx.load(str(path)).graph
    name_nodes_uniquely(graph)
    op_types = {node.name: node.op_type for node in graph.node}
    return [node.name for node in graph.node if node.op_type == "BatchNormalization"], op_types


def torch_folds(model: nn.Module, plan: FoldPlan) -> dict[int, tuple[str, str]]:
    """Position of each folded BN call among the plan's sites: (direction, layer kind)."""
    position = {site.name: index for index, site in enumerate(plan.sites)}
    return {
        position[step.bn]: (step.direction, torch_layer_kind(model.get_submodule(step.layer)))
        for step in plan.steps
    }


# The TorchScript exporter's deprecation, tracer and constant-folding chatter, silenced as
# convert/torch/pipeline.py silences it; the count check and the conversion are the gates.
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("build", "shape"), torch_pattern_suite())
def test_onnx_path_folds_what_the_torch_path_folds(
    build, shape: tuple[int, ...], tmp_path: Path, request
) -> None:
    case_id = request.node.callspec.id
    model = build()
    example = torch.from_numpy(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    plan = plan_folds(trace(model, example, case_id))
    dynamic = not has_batch_statistics_module(model)
    source = export(model, tmp_path / "source.onnx", shape, dynamic=dynamic)
    batchnorms, op_types = exported_batchnorms(source)
    assert len(batchnorms) == len(plan.sites), "the exporter fused or split a BatchNorm"

    result = convert_onnx_file(
        source, repository=tmp_path / "repository", name="net", version=None, sample=None
    )
    position = {name: index for index, name in enumerate(batchnorms)}
    onnx_folds = {
        position[item.name]: (item.direction, ONNX_LAYER_KINDS[op_types[item.into]])
        for item in result.batchnorm.folded
    }
    expected = torch_folds(model, plan)
    if case_id in ONNX_ONLY_FOLDS:
        extra = {index: fold for index, fold in onnx_folds.items() if index not in expected}
        assert extra, f"{case_id}: the ONNX path no longer folds more: {ONNX_ONLY_FOLDS[case_id]}"
        kept = {item.name: item.reason for item in plan.kept}
        for index in extra:
            assert kept[plan.sites[index].name].startswith("parameters are shared")
        expected = {**expected, **extra}
    assert onnx_folds == expected

    batch = shape[0] if not dynamic else FRESH_BATCH
    fresh = np.random.default_rng(11).standard_normal((batch, *shape[1:])).astype(np.float32)
    (actual,) = run_onnx(Path(result.package_path) / "model.onnx", fresh)
    expected_output = torch_eval(model, fresh)
    undefined = np.isnan(expected_output)  # a negative running variance: NaN in both paths
    assert np.array_equal(np.isnan(actual), undefined)
    assert within_float32_tolerance(actual[~undefined], expected_output[~undefined])
