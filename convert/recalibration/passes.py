"""Which BatchNorm layers one pass over the data can estimate, and the graph that pass runs.

A layer's input depends on the running statistics of every BN layer upstream
of it, and on nothing downstream. Its BN-dependency depth is 0 when no other
layer lies upstream, else one more than the deepest layer that does:

      input ─► conv ─► BN a (0) ─► conv ─► BN b (1) ─► add ─► BN d (2)
                 └───► conv ─────────────► BN c (1) ─┘

So once every layer of depth < d has its new statistics, all layers of depth d
can be estimated together in one pass over the data: passes = depth + 1, not
one per layer (ResNet-18: 20 BN layers, 17 passes, the downsample BNs sharing
their block's; a network with wider parallel branches gains more).

onnxruntime runs every node of a graph, so each pass runs calibration.onnx
pruned to the nodes its statistics outputs need: a pass for shallow layers
stops early in the network. Pure functions on protos; nothing runs here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from onnx import ModelProto, NodeProto, helper

from bnfold.convert.onnx.graph import subgraph_free_names


def node_inputs(node: NodeProto) -> set[str]:
    """Every tensor a node reads, the outer-scope names its subgraphs read included."""
    return {name for name in node.input if name} | subgraph_free_names(node)


def layer_depths(model: ModelProto, layers: Collection[str]) -> dict[str, int]:
    """Each layer's BN-dependency depth; a layer is the BatchNormalization node of its name.

    Nodes are in topological order (the ONNX rule), so one sweep suffices:
    `reach[t]` is one more than the deepest layer upstream of tensor t (0: none).
    Raises ValueError when a layer has no such node.
    """
    reach: dict[str, int] = {}
    depths: dict[str, int] = {}
    for node in model.graph.node:
        upstream = max((reach.get(name, 0) for name in node_inputs(node)), default=0)
        if node.op_type == "BatchNormalization" and node.name in layers:
            depths[node.name] = upstream
            upstream += 1
        for output in node.output:
            if output:
                reach[output] = upstream
    missing = [layer for layer in layers if layer not in depths]
    if missing:
        raise ValueError(f"no BatchNormalization node is named {missing[0]}")
    return depths


def pruned(model: ModelProto, outputs: Sequence[str]) -> ModelProto:
    """A new model computing only `outputs`: the nodes, inputs and initializers they need.

    Graph outputs keep their declared types; an output that no node produces and
    no graph input provides is a ValueError.
    """
    graph = model.graph
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed |= node_inputs(node)
    kept.reverse()
    declared = {value.name: value for value in graph.output}
    available = {output for node in kept for output in node.output} | {
        value.name for value in graph.input
    }
    missing = [name for name in outputs if name not in available]
    if missing:
        raise ValueError(f"the graph computes no tensor {missing[0]}")
    result = _header(model)
    small = result.graph
    small.name = graph.name
    small.node.extend(kept)
    small.input.extend(value for value in graph.input if value.name in needed)
    small.output.extend(
        declared.get(name) or helper.make_empty_tensor_value_info(name) for name in outputs
    )
    small.initializer.extend(tensor for tensor in graph.initializer if tensor.name in needed)
    small.value_info.extend(value for value in graph.value_info if value.name in needed)
    return result


def _header(model: ModelProto) -> ModelProto:
    """An empty-graph model with `model`'s IR version, opsets and functions."""
    result = ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
    )
    result.opset_import.extend(model.opset_import)
    result.functions.extend(model.functions)
    return result
