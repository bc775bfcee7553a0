"""The train-mode graph: every BN normalises with its batch statistics.

Built on a traced copy of the *original* (unfolded) model. Each BN module call
is replaced by `BatchStatisticsNorm`, which computes the batch mean and the biased
batch variance over N and the spatial axes exactly as torch's train mode does,
from plain ops (ReduceMean, Sub, Mul, Sqrt, Div, Add once exported), because
onnxruntime's inference build does not run BatchNormalization with
training_mode=1. The batch statistics become extra graph outputs named after
the BN (see `batch_stat_output_names`). Only BN switches mode: Dropout and the
rest stay in eval, so train.onnx and model.onnx differ by BatchNorm alone. No
running statistic is ever updated.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.torch.graph import BatchNormSite
from bnfold.package_format import batch_stat_output_names


class BatchStatisticsNorm(nn.Module):
    """BatchNorm with batch statistics, returning (y, batch_mean, batch_var)."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.eps = float(bn.eps)
        self.affine = bool(bn.affine)
        if self.affine:
            self.register_buffer("gamma", bn.weight.detach().clone())
            self.register_buffer("beta", bn.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reduce_dims = [0, *range(2, x.dim())]
        channel_shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=reduce_dims, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=reduce_dims, keepdim=True)
        y = centered / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.gamma.reshape(channel_shape) + self.beta.reshape(channel_shape)
        return y, mean.reshape(-1), var.reshape(-1)


class BatchStatisticsOnly(nn.Module):
    """For model.onnx: a track_running_stats=False BN, which uses batch statistics in eval too."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.norm = BatchStatisticsNorm(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)[0]


def build_train_graph(
    graph_module: fx.GraphModule, sites: list[BatchNormSite]
) -> tuple[fx.GraphModule, list[str]]:
    """Rewrite a traced copy so it returns (*outputs, mean_0, var_0, mean_1, ...).

    Every BN module site normalises with batch statistics; only the sites that
    are manifest layers (`is_layer`) add their mean and variance to the
    outputs. Functional batch_norm sites are left alone. Returns the module and
    the names of the extra outputs, in order.
    """
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    stat_nodes: list[fx.Node] = []
    stat_names: list[str] = []
    for index, site in enumerate(sites):
        if site.module_path is None:
            continue
        node = nodes[site.node_name]
        bn = graph_module.get_submodule(site.module_path)
        assert isinstance(bn, _BatchNorm)
        replacement_path = f"_bnfold_batch_stats_{index}"
        graph_module.add_submodule(replacement_path, BatchStatisticsNorm(bn))
        with graph.inserting_after(node):
            call = graph.call_module(replacement_path, node.args, node.kwargs)
        with graph.inserting_after(call):
            normalised = graph.call_function(operator.getitem, (call, 0))
        node.replace_all_uses_with(normalised)
        graph.erase_node(node)
        if not site.is_layer:
            continue
        with graph.inserting_after(normalised):
            batch_mean = graph.call_function(operator.getitem, (call, 1))
        with graph.inserting_after(batch_mean):
            batch_var = graph.call_function(operator.getitem, (call, 2))
        stat_nodes.extend([batch_mean, batch_var])
        stat_names.extend(batch_stat_output_names(site.name))
    output_node = next(node for node in graph.nodes if node.op == "output")
    original = output_node.args[0]
    outputs = list(original) if isinstance(original, (tuple, list)) else [original]
    output_node.args = (tuple(outputs + stat_nodes),)
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, stat_names


def replace_batch_statistics_bns(graph_module: fx.GraphModule, module_paths: list[str]) -> None:
    """Swap track_running_stats=False BNs for an exportable batch-statistics module."""
    for path in module_paths:
        bn = graph_module.get_submodule(path)
        assert isinstance(bn, _BatchNorm)
        parent_path, _, child = path.rpartition(".")
        parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
        setattr(parent, child, BatchStatisticsOnly(bn))
    graph_module.recompile()
