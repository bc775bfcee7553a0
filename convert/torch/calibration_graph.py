"""calibration.onnx from a torch model: the unfolded eval graph, running statistics as inputs.

The TorchScript exporter folds an eval-mode BN into the Conv before it when
its statistics are constants, so exporting the original would leave no
BatchNormalization to calibrate. Instead a traced copy of the *original*
model gets one pair of placeholders per manifest layer, and each layer's BN
call becomes `OverridableStatisticsNorm(x, running_mean, running_var)`: eval
mode (`F.batch_norm(training=False)`) normalising with whatever it is given,
which the exporter cannot fold. In ONNX (`finish_calibration_graph`), the BN
reading each pair is renamed to its layer, and the ONNX path's
`build_calibration_graph` adds the running statistics as the inputs' defaults
and the input-statistics taps, so both sources give the same graph interface.

Functional batch_norm sites are never layers and stay as traced;
track_running_stats=False BNs use batch statistics as in model.onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from onnx import ModelProto
from torch import fx, nn
from torch.nn import functional
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.errors import UnsupportedSource
from bnfold.convert.onnx.batchnorm import BATCHNORM
from bnfold.convert.onnx.calibration_graph import CalibrationLayer, build_calibration_graph
from bnfold.convert.onnx.graph import infer_tensor_info, iter_nodes
from bnfold.convert.torch.graph import BatchNormSite
from bnfold.package_format import running_stat_input_names


class OverridableStatisticsNorm(nn.Module):
    """A BN module's eval-mode map with the running statistics as call arguments."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.eps = float(bn.eps)
        affine = bool(bn.affine)
        self.register_buffer("weight", bn.weight.detach().clone() if affine else None)
        self.register_buffer("bias", bn.bias.detach().clone() if affine else None)

    def forward(
        self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
    ) -> torch.Tensor:
        return functional.batch_norm(
            x, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps
        )


@dataclass
class CalibrationModule:
    """The rewritten module, its extra inputs (names and example values) and its layers."""

    module: fx.GraphModule
    input_names: list[str]
    statistics: list[torch.Tensor]
    layers: list[CalibrationLayer]


def build_calibration_module(
    graph_module: fx.GraphModule, sites: list[BatchNormSite]
) -> CalibrationModule:
    """Rewrite a traced copy of the original so each manifest layer reads its statistics
    from two new arguments after the input, in `sites` order (`running_stat_input_names`)."""
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    # Right after the model's input, so the model's own optional arguments (with defaults)
    # stay last and keep their defaults in the export's positional call.
    last_placeholder = next(node for node in graph.nodes if node.op == "placeholder")
    input_names: list[str] = []
    statistics: list[torch.Tensor] = []
    layers: list[CalibrationLayer] = []
    for index, site in enumerate(sites):
        if not site.is_layer:
            continue
        assert site.module_path is not None
        node = nodes[site.node_name]
        bn = graph_module.get_submodule(site.module_path)
        assert isinstance(bn, _BatchNorm) and bn.running_mean is not None
        assert bn.running_var is not None
        placeholders = []
        for label in ("running_mean", "running_var"):
            with graph.inserting_after(last_placeholder):
                last_placeholder = graph.placeholder(f"_bnfold_{label}_{index}")
            placeholders.append(last_placeholder)
        replacement_path = f"_bnfold_calibration_{index}"
        graph_module.add_submodule(replacement_path, OverridableStatisticsNorm(bn))
        with graph.inserting_after(node):
            call = graph.call_module(replacement_path, (node.args[0], *placeholders))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        input_names.extend(running_stat_input_names(site.name))
        mean, var = bn.running_mean.detach().float(), bn.running_var.detach().float()
        statistics.extend([mean.clone(), var.clone()])
        layers.append(CalibrationLayer(site.name, mean.numpy().copy(), var.numpy().copy()))
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return CalibrationModule(graph_module, input_names, statistics, layers)


def finish_calibration_graph(model: ModelProto, layers: list[CalibrationLayer]) -> list[str]:
    """Turn the exported graph into calibration.onnx, in place; returns the statistics outputs.

    Each layer's BatchNormalization is found by the running-mean input it reads
    and renamed to the layer (another node already bearing that name is
    renamed out of the way), then `build_calibration_graph` does the rest.
    """
    readers = {
        node.input[3]: node for _, node in iter_nodes(model.graph, BATCHNORM) if len(node.input) > 3
    }
    layer_names = {layer.name for layer in layers}
    for node in model.graph.node:
        if node.name in layer_names:
            node.name = f"{node.name}/exported"
    for layer in layers:
        mean_input = running_stat_input_names(layer.name)[0]
        node = readers.get(mean_input)
        if node is None:
            raise UnsupportedSource(
                f"cannot build calibration.onnx: the exported graph has no BatchNormalization "
                f"reading {mean_input}"
            )
        node.name = layer.name
    return build_calibration_graph(model, infer_tensor_info(model), layers)
