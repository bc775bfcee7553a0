"""Apply a `FoldPlan` to a traced copy of the model: thin torch adapter over `fold`.

Every parameter rewrite goes through `bnfold.convert.fold`; this module only
moves tensors in and out of numpy and removes the folded BN calls (with the
`get_attr` nodes only a functional batch_norm read).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from bnfold.convert.fold import BatchNormParams, fold_after_layer, fold_before_layer
from bnfold.convert.torch.graph import (
    CONV_TRANSPOSE_TYPES,
    BatchNormTensors,
    FoldPlan,
    FoldStep,
    batchnorm_input,
    batchnorm_tensors,
)


def batchnorm_params(tensors: BatchNormTensors) -> BatchNormParams:
    return BatchNormParams(
        running_mean=_numpy(tensors.running_mean),
        running_var=_numpy(tensors.running_var),
        eps=tensors.eps,
        gamma=None if tensors.weight is None else _numpy(tensors.weight),
        beta=None if tensors.bias is None else _numpy(tensors.bias),
    )


def apply_plan(graph_module: fx.GraphModule, plan: FoldPlan) -> fx.GraphModule:
    """Rewrite `graph_module` in place (it must be the caller's own copy)."""
    modules = dict(graph_module.named_modules())
    nodes = {node.name: node for node in graph_module.graph.nodes}
    for step in plan.steps:
        node = nodes[step.node_name]
        tensors = batchnorm_tensors(graph_module, node)
        assert isinstance(tensors, BatchNormTensors), tensors
        _fold_step(modules[step.layer], batchnorm_params(tensors), step)
        source = batchnorm_input(node)
        assert isinstance(source, fx.Node)
        node.replace_all_uses_with(source)
        read = node.all_input_nodes
        graph_module.graph.erase_node(node)
        for attribute in read:
            if attribute.op == "get_attr" and not attribute.users:
                graph_module.graph.erase_node(attribute)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _fold_step(layer: nn.Module, params: BatchNormParams, step: FoldStep) -> None:
    weight = layer.weight
    bias = layer.bias
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
