"""Reading BatchNormalization nodes, and the guards that hold in every fold direction.

A BN can only fold when it is the plain inference-mode affine map: from
opset 14 on, `training_mode` absent or 0; before 14 (opsets 9-13 have no such
attribute) a single output, because the spec, and onnxruntime, take the
optional mean/var/saved outputs as training mode. And all four parameters
must be constant. Each failed guard becomes the reason the BN is kept. Direction-
specific guards (who produces or reads the tensor) live with their pattern.

A BN is a manifest layer (and gets train.onnx statistics outputs) only when
its running mean and variance are constant and usable (`running_statistics_problem`):
one whose statistics are graph inputs has none to record, so it is kept, with
a reason saying it is not in `batchnorm.layers`, rather than written as a
layer the service would refuse.

The BN's layer name (the manifest's `batchnorm.layers[].name`, the prefix of
the train graph's `.batch_mean`/`.batch_var` outputs) is its node name; the
pipeline names every nameless node first, so BNs are `BatchNormalization_<i>`
when the exporter left them unnamed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from onnx import NodeProto

from bnfold.convert.fold import BatchNormParams
from bnfold.convert.onnx.graph import GraphEdit, GraphIndex, iter_nodes, node_attribute
from bnfold.convert.report import NOT_A_LAYER, BatchNormLayer, running_statistics_problem
from bnfold.package_format import batch_stat_output_names

BATCHNORM = "BatchNormalization"
DEFAULT_EPSILON = 1e-5

REASON_TRAINING_MODE = "training_mode=1: the BN normalises with batch statistics"
REASON_STATS_OUTPUTS = (
    "it has running-statistics outputs, which before opset 14 means training mode"
)
TRAINING_MODE_ATTRIBUTE_OPSET = 14
REASON_NOT_CONSTANT = "BN parameters are not constant initializers"
REASON_NO_RUNNING_STATISTICS = (
    "its running mean or variance is not constant (no running statistics)"
)
REASON_NOT_PER_CHANNEL = "BN parameters are not per-channel vectors of one length"
REASON_CHANNEL_AXIS = "channel axis does not line up"


@dataclass(frozen=True)
class BatchNormNode:
    """One BatchNormalization node as the passes see it.

    `params` is None when the parameters are not constant; `blocked` holds the
    direction-independent reason the BN cannot fold at all, or None.
    `statistics` is (running_mean, running_var) when the BN is a manifest
    layer, None when it is not (and then `blocked` says why).
    """

    index: int
    node: NodeProto
    params: BatchNormParams | None
    blocked: str | None
    statistics: tuple[np.ndarray, np.ndarray] | None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def input(self) -> str:
        return self.node.input[0]

    @property
    def output(self) -> str:
        return self.node.output[0]

    @property
    def parameter_names(self) -> list[str]:
        return list(self.node.input[1:5])

    @property
    def epsilon(self) -> float:
        return _epsilon(self.node)


Match = TypeVar("Match")


def collect_matches(
    batchnorms: list[BatchNormNode], match: Callable[[BatchNormNode], Match | str | None]
) -> tuple[list[Match], dict[str, str]]:
    """Run one pattern's `match` over every BN, before anything is rewritten.

    `match` returns a match, the reason this BN cannot fold in that pattern,
    or None when the pattern does not concern the BN at all.
    """
    matches: list[Match] = []
    reasons: dict[str, str] = {}
    for bn in batchnorms:
        found = match(bn)
        if isinstance(found, str):
            reasons[bn.name] = found
        elif found is not None:
            matches.append(found)
    return matches, reasons


def remove_batchnorm(edit: GraphEdit, bn: BatchNormNode) -> None:
    """Drop the BN node; its parameters go too unless something else reads them."""
    edit.remove(bn.index)
    edit.release([bn.output, *bn.parameter_names])


def read_batchnorms(index: GraphIndex) -> list[BatchNormNode]:
    """Every BatchNormalization node of the main graph, in graph order, with its guards."""
    return [read_batchnorm(index, position) for position, _ in iter_nodes(index.graph, BATCHNORM)]


def read_batchnorm(index: GraphIndex, position: int) -> BatchNormNode:
    node = index.nodes[position]
    params = _constant_params(index, node)
    statistics = _running_statistics(index, node)
    blocked: str | None = None
    if int(node_attribute(node, "training_mode", 0)) == 1:
        blocked = REASON_TRAINING_MODE
    elif index.opset < TRAINING_MODE_ATTRIBUTE_OPSET and any(node.output[1:]):
        blocked = REASON_STATS_OUTPUTS
    elif params is None:
        blocked = _not_constant_reason(index, node)
    if isinstance(statistics, str):
        not_a_layer = f"{statistics}, {NOT_A_LAYER}"
        blocked = not_a_layer if blocked is None else f"{blocked}; {not_a_layer}"
        return BatchNormNode(position, node, params, blocked, None)
    return BatchNormNode(position, node, params, blocked, statistics)


def _not_constant_reason(index: GraphIndex, node: NodeProto) -> str:
    """Why `_constant_params` found no parameters: which are not constant, or their shapes."""
    names = [name for name in node.input[1:5] if index.constant(name) is None]
    overridable = [name for name in names if name in index.overridable]
    if overridable:
        return (
            f"BN parameters {', '.join(overridable)} are overridable graph inputs "
            "(initializers also listed in graph.input), so they are not constant"
        )
    return REASON_NOT_CONSTANT if names else REASON_NOT_PER_CHANNEL


def _running_statistics(index: GraphIndex, node: NodeProto) -> tuple[np.ndarray, np.ndarray] | str:
    """The constant running mean and variance, or why the BN has none a manifest can hold."""
    mean, var = index.constant(node.input[3]), index.constant(node.input[4])
    if mean is None or var is None:
        return REASON_NO_RUNNING_STATISTICS
    problem = running_statistics_problem(mean, var)
    return problem if problem is not None else (mean, var)


def _constant_params(index: GraphIndex, node: NodeProto) -> BatchNormParams | None:
    values = [index.constant(name) for name in node.input[1:5]]
    if any(value is None for value in values):
        return None
    scale, bias, mean, var = (np.asarray(value) for value in values)
    if scale.ndim != 1 or any(other.shape != scale.shape for other in (bias, mean, var)):
        return None
    return BatchNormParams(
        running_mean=mean, running_var=var, eps=_epsilon(node), gamma=scale, beta=bias
    )


def _epsilon(node: NodeProto) -> float:
    return float(node_attribute(node, "epsilon", DEFAULT_EPSILON))


def batchnorm_layer(index: GraphIndex, bn: BatchNormNode) -> BatchNormLayer | None:
    """The manifest's layer entry, or None for a BN without running statistics."""
    if bn.statistics is None:
        return None
    running_mean, running_var = bn.statistics
    mean_output, var_output = batch_stat_output_names(bn.name)
    rank = index.rank(bn.input)
    return BatchNormLayer(
        name=bn.name,
        channels=int(running_mean.size),
        eps=bn.epsilon,
        running_mean=np.asarray(running_mean, float).tolist(),
        running_var=np.asarray(running_var, float).tolist(),
        input_rank=-1 if rank is None else rank,
        batch_mean_output=mean_output,
        batch_var_output=var_output,
    )
