"""Apply a `FoldPlan` to a traced copy of the model: thin torch adapter over `fold`.

Every parameter rewrite goes through `bnfold.convert.fold`; this module only
moves tensors in and out of numpy and removes the folded BN nodes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.fold import BatchNormParams, fold_after_layer, fold_before_layer
from bnfold.convert.torch.graph import CONV_TRANSPOSE_TYPES, FoldPlan, FoldStep


def batchnorm_params(bn: _BatchNorm) -> BatchNormParams:
    assert bn.running_mean is not None and bn.running_var is not None
    return BatchNormParams(
        running_mean=_numpy(bn.running_mean),
        running_var=_numpy(bn.running_var),
        eps=float(bn.eps),
        gamma=_numpy(bn.weight) if bn.affine else None,
        beta=_numpy(bn.bias) if bn.affine else None,
    )


def apply_plan(graph_module: fx.GraphModule, plan: FoldPlan) -> fx.GraphModule:
    """Rewrite `graph_module` in place (it must be the caller's own copy)."""
    modules = dict(graph_module.named_modules())
    bn_nodes = {
        str(node.target): node for node in graph_module.graph.nodes if node.op == "call_module"
    }
    for step in plan.steps:
        bn = modules[step.bn]
        layer = modules[step.layer]
        assert isinstance(bn, _BatchNorm)
        _fold_step(layer, bn, step)
        node = bn_nodes[step.bn]
        node.replace_all_uses_with(node.args[0])
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _fold_step(layer: nn.Module, bn: _BatchNorm, step: FoldStep) -> None:
    weight = layer.weight
    bias = layer.bias
    params = batchnorm_params(bn)
    groups = int(getattr(layer, "groups", 1))
    current_bias = None if bias is None else _numpy(bias)
    if step.direction == "forward":
        folded = fold_after_layer(
            _numpy(weight),
            current_bias,
            params,
            transposed=isinstance(layer, CONV_TRANSPOSE_TYPES),
            groups=groups,
        )
    else:
        folded = fold_before_layer(
            _numpy(weight), current_bias, params, groups=groups, repeats=step.repeats
        )
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.from_numpy(folded.weight).to(weight.dtype))
        layer.bias = nn.Parameter(torch.from_numpy(folded.bias).to(weight.dtype))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()
