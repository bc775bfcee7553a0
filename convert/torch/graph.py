"""Find the BatchNorms a traced torch model can fold, and why the others cannot.

Works on a torch.fx graph with shapes propagated from an example input, never
on module order: a BN folds into the layer that really produces (forward) or
really consumes (backward) its tensor. The decisions are pure: this module
reads the graph and returns a `FoldPlan`; `torch_fold` applies it.

A BN call is a BatchNorm module's, or a functional one
(`torch.nn.functional.batch_norm`, `torch.batch_norm`) with training=False
whose running statistics (and weight and bias, if any) are module tensors
(`get_attr` nodes: buffers, parameters, traced constants), so constant in
eval: the same affine map, folded the same way and reported under the path of
its running mean. Such a call is never a manifest layer: its training flag is
part of the call, so the model's train mode does not switch it to batch
statistics, and train.onnx keeps it as traced.

Patterns (→ data flow, [..] optional eval-mode no-ops: Dropout, Identity):

    forward:   Conv/ConvTranspose ─[..]→ BN
               Linear ─[..]→ BN1d                         on (N, C)
               Linear ─→ transpose(1, 2) / permute(0, 2, 1) ─→ BN1d   (N, L, C) → (N, C, L)
    backward:  BN ─[.. / Flatten]→ Linear
               BN ─[..]→ Conv   only without zero padding (padding 0 or a
                                non-zeros padding_mode): a padded zero is not
                                BN(0), so zero padding would break exactness.

Guards (a BN matching none of these is kept, with the reason):
    the layer's output or the BN's output has other users (residual branch),
    a non-linear op sits in between, track_running_stats=False (functional:
    training=True, or statistics computed in the graph), the channel axis does
    not line up, the BN module or the layer is applied in several places or
    its parameters are tied to another module's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.report import NOT_A_LAYER, KeptBatchNorm, running_statistics_problem

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FORWARD_TARGET_TYPES = (*CONV_TYPES, *CONV_TRANSPOSE_TYPES, nn.Linear)
#: Modules that are the identity in eval mode: a fold may look through them.
EVAL_NO_OP_TYPES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
FUNCTIONAL_BATCH_NORMS = (functional.batch_norm, torch.batch_norm)
REASON_NO_RUNNING_STATISTICS = (
    "track_running_stats=False: eval mode normalises with batch statistics; "
    "there is no fixed affine map to fold and no running statistics"
)


@dataclass(frozen=True)
class FoldStep:
    """Fold the BN call at fx node `node_name`, reported as `bn`, into layer module `layer`.

    `repeats` > 1 when a Flatten sits between a backward-folded BN and a
    Linear: each BN channel then covers `repeats` consecutive input features.
    """

    bn: str
    node_name: str
    layer: str
    direction: str  # "forward" | "backward"
    repeats: int = 1


@dataclass(frozen=True)
class BatchNormSite:
    """One BN call in the graph: a BN module's application, or a functional batch_norm.

    `name` is unique: the module path (functional: its running mean's path),
    suffixed `@<node>` when several calls share it. `module_path` is None for a
    functional call. `is_layer`: the BN has running statistics for the
    manifest's `batchnorm.layers` (and train.onnx's statistics outputs); never
    true for a functional call.
    """

    name: str
    module_path: str | None
    node_name: str
    input_rank: int
    is_layer: bool


@dataclass(frozen=True)
class BatchNormTensors:
    """What one BN call normalises with in eval mode; weight and bias None without affine."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


@dataclass
class FoldPlan:
    steps: list[FoldStep] = field(default_factory=list)
    kept: list[KeptBatchNorm] = field(default_factory=list)
    sites: list[BatchNormSite] = field(default_factory=list)

    @property
    def layer_sites(self) -> list[BatchNormSite]:
        """The sites that are manifest layers, in graph order."""
        return [site for site in self.sites if site.is_layer]


def plan_folds(graph_module: fx.GraphModule) -> FoldPlan:
    """Decide, for every BN call in the graph, whether and where it folds.

    Requires `node.meta["tensor_meta"]` from shape propagation.
    """
    analysis = _GraphAnalysis(graph_module)
    plan = FoldPlan()
    for node in analysis.batchnorm_nodes:
        owner = analysis.owner(node)
        module_path = str(node.target) if node.op == "call_module" else None
        name = owner if analysis.call_counts[owner] == 1 else f"{owner}@{node.name}"
        tensors = batchnorm_tensors(graph_module, node)
        is_layer = module_path is not None and _statistics_reason(tensors) is None
        rank = _rank(batchnorm_input(node))
        plan.sites.append(BatchNormSite(name, module_path, node.name, rank, is_layer))
        step_or_reason = analysis.decide(node, name, tensors)
        if isinstance(step_or_reason, FoldStep):
            plan.steps.append(step_or_reason)
        else:
            plan.kept.append(KeptBatchNorm(name, step_or_reason))
    return plan


def is_functional_batchnorm(node: fx.Node) -> bool:
    return node.op == "call_function" and any(
        node.target is function for function in FUNCTIONAL_BATCH_NORMS
    )


def batchnorm_input(node: fx.Node) -> object:
    """The tensor a BN call normalises (module call or functional batch_norm)."""
    return node.args[0] if node.args else node.kwargs["input"]


def batchnorm_tensors(graph_module: fx.GraphModule, node: fx.Node) -> BatchNormTensors | str:
    """The constant tensors of a BN call, or why it normalises with something else."""
    if not is_functional_batchnorm(node):
        bn = graph_module.get_submodule(str(node.target))
        assert isinstance(bn, _BatchNorm)
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return REASON_NO_RUNNING_STATISTICS
        affine = bool(bn.affine)
        return BatchNormTensors(
            bn.running_mean,
            bn.running_var,
            bn.weight if affine else None,
            bn.bias if affine else None,
            float(bn.eps),
        )
    arguments = _functional_arguments(graph_module, node)
    if arguments is None:
        return "the arguments of the functional batch_norm cannot be read"
    training = arguments.get("training", False)
    if training is True:
        return (
            "training=True: the functional batch_norm normalises with batch statistics; "
            "there is no fixed affine map to fold"
        )
    if training is not False:
        return "the functional batch_norm's training flag is not a constant False"
    tensors: dict[str, torch.Tensor | None] = {}
    for role in ("running_mean", "running_var", "weight", "bias"):
        value = arguments.get(role)
        tensor = _attribute_tensor(graph_module, value)
        if tensor is None and (value is not None or role.startswith("running")):
            return (
                f"the functional batch_norm's {role} is computed in the graph, "
                "not a module buffer or parameter, so it is not constant"
            )
        tensors[role] = tensor
    eps = arguments.get("eps", 1e-5)
    if not isinstance(eps, (int, float)):
        return "the functional batch_norm's eps is not a constant number"
    running_mean, running_var = tensors["running_mean"], tensors["running_var"]
    assert running_mean is not None and running_var is not None
    return BatchNormTensors(running_mean, running_var, tensors["weight"], tensors["bias"], eps)


def _functional_arguments(graph_module: fx.GraphModule, node: fx.Node) -> dict[str, object] | None:
    """A functional batch_norm call's arguments by name, defaults filled in (None if unreadable)."""
    normalized = node.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
    return None if normalized is None else dict(normalized.kwargs)


def _attribute_tensor(graph_module: fx.GraphModule, value: object) -> torch.Tensor | None:
    """The module tensor a `get_attr` node reads, or None for anything computed in the graph."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    owner_path, _, attribute = str(value.target).rpartition(".")
    tensor = getattr(graph_module.get_submodule(owner_path), attribute, None)
    return tensor if isinstance(tensor, torch.Tensor) else None


def _statistics_reason(tensors: BatchNormTensors | str) -> str | None:
    """Why a BN call has no running statistics to fold and record, or None."""
    if isinstance(tensors, str):
        return tensors
    return running_statistics_problem(
        tensors.running_mean.detach().cpu().numpy(), tensors.running_var.detach().cpu().numpy()
    )


class _GraphAnalysis:
    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.modules = dict(graph_module.named_modules())
        self.batchnorm_nodes = [
            node
            for node in graph_module.graph.nodes
            if isinstance(self._module(node), _BatchNorm) or is_functional_batchnorm(node)
        ]
        self.call_counts: Counter[str] = Counter(
            str(node.target) for node in graph_module.graph.nodes if node.op == "call_module"
        )
        self.call_counts.update(
            self.owner(node) for node in self.batchnorm_nodes if is_functional_batchnorm(node)
        )
        self._parameter_owners = _parameter_owners(graph_module)

    def owner(self, bn_node: fx.Node) -> str:
        """What a BN call is named after: its module's path, or its running mean's path."""
        if not is_functional_batchnorm(bn_node):
            return str(bn_node.target)
        arguments = _functional_arguments(self.graph_module, bn_node) or {}
        running_mean = arguments.get("running_mean")
        if isinstance(running_mean, fx.Node) and running_mean.op == "get_attr":
            return str(running_mean.target)
        return bn_node.name

    def _module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.modules.get(str(node.target))

    def decide(
        self, bn_node: fx.Node, name: str, tensors: BatchNormTensors | str
    ) -> FoldStep | str:
        """A functional call is never a layer, and folding it changes none of the tensors it
        reads, so the module guards on sharing do not apply to it."""
        no_statistics = _statistics_reason(tensors)
        functional_call = is_functional_batchnorm(bn_node)
        if no_statistics is not None:
            return no_statistics if functional_call else f"{no_statistics}, {NOT_A_LAYER}"
        if not functional_call:
            shared = self._unshareable(str(bn_node.target), "the BN module")
            if shared:
                return shared
        forward = self._forward(bn_node, name)
        if isinstance(forward, FoldStep):
            return forward
        backward = self._backward(bn_node, name)
        if isinstance(backward, FoldStep):
            return backward
        return f"{forward}; {backward}"

    # ---- forward: layer → BN -------------------------------------------------
    def _forward(self, bn_node: fx.Node, name: str) -> FoldStep | str:
        source = batchnorm_input(bn_node)
        if not isinstance(source, fx.Node):
            return "its input is not a tensor produced in the graph"
        chain: list[fx.Node] = []
        channel_moved = False
        while True:
            if len(source.users) > 1:
                return (
                    f"`{_describe(source)}` feeds {len(source.users)} users "
                    "(a residual branch): folding would change the other users"
                )
            module = self._module(source)
            if isinstance(module, FORWARD_TARGET_TYPES):
                break
            if isinstance(module, EVAL_NO_OP_TYPES):
                chain.append(source)
                source = source.args[0]
                continue
            if _moves_last_axis_to_channel(source) and not channel_moved:
                channel_moved = True
                chain.append(source)
                source = source.args[0]
                continue
            if source.op == "placeholder":
                return "it reads a graph input directly (no layer before it)"
            return f"a non-linear or unsupported op `{_describe(source)}` sits between it and the layer before"
        layer_path = str(source.target)
        layer = self.modules[layer_path]
        reason = self._unshareable(layer_path, f"`{layer_path}`")
        if reason:
            return reason
        output_rank = _rank(source)
        if isinstance(layer, nn.Linear):
            if channel_moved and output_rank != 3:
                return (
                    f"channel axis does not line up: `{layer_path}` output has rank {output_rank}, "
                    "the transpose only proves the mapping for (N, L, C)"
                )
            if not channel_moved and output_rank != 2:
                return (
                    f"channel axis does not line up: BN normalises axis 1 of the rank-{output_rank} "
                    f"output of `{layer_path}`, whose features are on the last axis"
                )
        elif channel_moved:
            return f"channel axis does not line up: a transpose sits between `{layer_path}` and it"
        return FoldStep(name, bn_node.name, layer_path, "forward")

    # ---- backward: BN → layer ------------------------------------------------
    def _backward(self, bn_node: fx.Node, name: str) -> FoldStep | str:
        target = bn_node
        flatten_repeats: int | None = None
        while True:
            users = list(target.users)
            if len(users) != 1:
                return (
                    f"its output feeds {len(users)} users, not one layer"
                    if users
                    else "its output is unused"
                )
            (target,) = users
            if target.op == "output":
                return "its output is a graph output"
            module = self._module(target)
            if isinstance(module, EVAL_NO_OP_TYPES):
                continue
            if _is_flatten_from_1(target, module) and flatten_repeats is None:
                flatten_repeats = math.prod(_shape(batchnorm_input(bn_node))[2:])
                continue
            if isinstance(module, (*CONV_TYPES, nn.Linear)):
                break
            if isinstance(module, CONV_TRANSPOSE_TYPES):
                return (
                    f"`{target.target}` is a ConvTranspose: border outputs sum fewer inputs, "
                    "so the BN shift would not fold into one bias"
                )
            return f"a non-linear or unsupported op `{_describe(target)}` sits between it and the next layer"
        layer_path = str(target.target)
        layer = self.modules[layer_path]
        reason = self._unshareable(layer_path, f"`{layer_path}`")
        if reason:
            return reason
        input_rank = _rank(batchnorm_input(bn_node))
        if isinstance(layer, nn.Linear):
            if flatten_repeats is None and input_rank != 2:
                return (
                    f"channel axis does not line up: BN channels are axis 1 of a rank-{input_rank} "
                    f"tensor, `{layer_path}` reads the last axis"
                )
            return FoldStep(name, bn_node.name, layer_path, "backward", flatten_repeats or 1)
        if flatten_repeats is not None:
            return f"channel axis does not line up: a Flatten sits between it and `{layer_path}`"
        assert isinstance(layer, CONV_TYPES)
        if layer.padding_mode == "zeros" and any(layer._reversed_padding_repeated_twice):
            return (
                f"`{layer_path}` zero-pads its input: a padded zero is not BN(0), "
                "so the fold would not be exact"
            )
        return FoldStep(name, bn_node.name, layer_path, "backward")

    def _unshareable(self, module_path: str, subject: str) -> str | None:
        """Why the parameters of the module at `module_path` may not be rewritten: it is
        applied at several places, or its tensors are tied to another module's."""
        calls = self.call_counts[module_path]
        if calls > 1:
            return f"parameters are shared: {subject} is applied at {calls} places"
        shared = self._shared_with(module_path)
        if shared:
            return f"parameters are shared: {subject} ties parameters with `{shared}`"
        return None

    def _shared_with(self, module_path: str) -> str | None:
        module = self.modules[module_path]
        for tensor in _own_tensors(module):
            others = self._parameter_owners.get(id(tensor), set()) - {module_path}
            if others:
                return sorted(others)[0]
        return None


def _own_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from (buffer for buffer in module.buffers(recurse=False) if buffer is not None)


def _parameter_owners(graph_module: fx.GraphModule) -> dict[int, set[str]]:
    owners: dict[int, set[str]] = {}
    for path, module in graph_module.named_modules(remove_duplicate=False):
        for tensor in _own_tensors(module):
            owners.setdefault(id(tensor), set()).add(path)
    return owners


def _shape(node: object) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(dim) for dim in shape) if shape is not None else ()


def _rank(node: object) -> int:
    return len(_shape(node))


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.name


def _moves_last_axis_to_channel(node: fx.Node) -> bool:
    """True for transpose(1, 2) / permute(0, 2, 1) of a rank-3 tensor."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = getattr(node.target, "__name__", node.target)
    arguments = node.args[1:]
    if len(_shape(node)) != 3:
        return False
    if name == "transpose" and len(arguments) == 2:
        axes = {int(axis) % 3 for axis in arguments if isinstance(axis, int)}
        return axes == {1, 2}
    if name == "permute":
        dims = (
            arguments[0]
            if len(arguments) == 1 and isinstance(arguments[0], (list, tuple))
            else arguments
        )
        return [int(dim) % 3 for dim in dims] == [0, 2, 1]
    return False


def _is_flatten_from_1(node: fx.Node, module: nn.Module | None) -> bool:
    """nn.Flatten / torch.flatten / Tensor.flatten folding every axis from 1 on."""
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False
