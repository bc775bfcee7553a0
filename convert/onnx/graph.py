"""An index over one ONNX graph, and the batch edit every fold pass applies.

The passes never mutate the graph while they look at it: they read a
`GraphIndex` (who produces and who consumes each tensor, which tensors are
constant, their inferred shapes), describe their rewrite as a `GraphEdit`, and
`apply_edit` rebuilds the node list once. Only the main graph is rewritten;
names a subgraph (If/Loop/Scan body) reads from the outer scope count as
consumers of the node that owns the subgraph, so no guard misses them.

Constants are initializers, Constant nodes, and anything computed from those
alone by deterministic standard ops (the torch exporter routes shared BN
parameters through Identity and computes Pad's pads with a chain of
Shape/Concat/Slice on constants); those are evaluated with onnx's reference
evaluator, once per tensor.

An initializer that is also listed in `graph.input` (IR version 4 and later)
is not a constant but an overridable default: a caller may feed another value,
and onnxruntime honours it. Folding it would silently drop that input, so it
and everything computed from it count as non-constant, and the graph keeps it.
Before IR 4 every initializer had to be listed among the inputs, and
onnxruntime treats them as constants; so does bnfold.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

#: One inferred dimension: a size, a symbolic name, or None when unknown.
Dim = int | str | None
TensorShape = tuple[Dim, ...]

#: Ops whose output is not a function of their inputs: never folded as constants.
_NONDETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
#: Evaluating a longer constant chain than this is not worth it for a fold decision.
_MAX_CONSTANT_CLOSURE = 64
#: From this IR version on, an initializer listed in graph.input may be overridden.
OVERRIDABLE_INITIALIZERS_IR_VERSION = 4
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class TensorInfo:
    """What shape inference knows about one tensor: element type and shape (None: unranked)."""

    elem_type: int
    shape: TensorShape | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def default_opset(model: ModelProto) -> int | None:
    """The model's opset for the default (ai.onnx) domain, or None when it imports none."""
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            return int(opset.version)
    return None


def infer_tensor_info(model: ModelProto) -> dict[str, TensorInfo]:
    """Run onnx shape inference (with data propagation) and collect every typed tensor.

    `model` may hold external-data references instead of weights: inference
    only reads the initializers' dims, so callers pass the weight-free
    structure of a >2 GB model. Inference failures leave the tensors unknown
    rather than failing the conversion: every guard treats unknown as "keep".
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    graph = inferred.graph
    info: dict[str, TensorInfo] = {}
    for initializer in graph.initializer:
        info[initializer.name] = TensorInfo(initializer.data_type, tuple(initializer.dims))
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        shape: TensorShape | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(_dim_value(dim) for dim in tensor_type.shape.dim)
        info.setdefault(value.name, TensorInfo(tensor_type.elem_type, shape))
    return info


def _dim_value(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def overridable_initializers(model: ModelProto) -> set[str]:
    """Initializers a caller may override: those listed in graph.input, from IR 4 on."""
    if model.ir_version < OVERRIDABLE_INITIALIZERS_IR_VERSION:
        return set()
    inputs = {value.name for value in model.graph.input}
    return {tensor.name for tensor in model.graph.initializer if tensor.name in inputs}


def op_counts(graph: GraphProto) -> dict[str, int]:
    """Node count per op type in the main graph, most frequent first."""
    return dict(Counter(node.op_type for node in graph.node).most_common())


def node_attribute(node: NodeProto, name: str, default: Any = None) -> Any:
    """An attribute's Python value (bytes decoded to str), or `default` when absent."""
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def set_attribute(node: NodeProto, name: str, value: object) -> None:
    """Replace (or add) one attribute of `node` in place."""
    kept = [attribute for attribute in node.attribute if attribute.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


def subgraph_free_names(node: NodeProto) -> set[str]:
    """Outer-scope names that the subgraphs of `node` (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            names |= _graph_free_names(attribute.g)
        elif attribute.type == AttributeProto.GRAPHS:
            for graph in attribute.graphs:
                names |= _graph_free_names(graph)
    return names


def _graph_free_names(graph: GraphProto) -> set[str]:
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    used: set[str] = {value.name for value in graph.output}
    for node in graph.node:
        defined.update(node.output)
        used.update(name for name in node.input if name)
        used |= subgraph_free_names(node)
    return used - defined


def has_subgraph(node: NodeProto) -> bool:
    return any(
        attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
        for attribute in node.attribute
    )


@dataclass(frozen=True)
class Use:
    """One read of a tensor: by node `index`, at input slot `slot` (-1: from a subgraph)."""

    index: int
    slot: int


class GraphIndex:
    """Producers, consumers, constants and shapes of one main graph, read-only."""

    def __init__(self, model: ModelProto, tensor_info: dict[str, TensorInfo]) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model) or 0
        self.tensor_info = tensor_info
        self.nodes: list[NodeProto] = list(self.graph.node)
        self.initializers: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        self.graph_outputs: set[str] = {value.name for value in self.graph.output}
        self.graph_inputs: set[str] = {
            value.name for value in self.graph.input if value.name not in self.initializers
        }
        self.overridable: set[str] = overridable_initializers(model)
        self.producer: dict[str, int] = {}
        self.uses: dict[str, list[Use]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for slot, name in enumerate(node.input):
                if name:
                    self.uses.setdefault(name, []).append(Use(index, slot))
            for name in subgraph_free_names(node):
                self.uses.setdefault(name, []).append(Use(index, -1))
        self._constants: dict[str, np.ndarray | None] = {}
        self._names: set[str] | None = None

    # -- structure ---------------------------------------------------------------------------

    def producer_of(self, name: str) -> NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def is_used(self, name: str) -> bool:
        return name in self.graph_outputs or bool(self.uses.get(name))

    def sole_use(self, name: str) -> Use | None:
        """The one read of `name`, or None if it has several, none, or is a graph output."""
        uses = self.uses.get(name, [])
        if name in self.graph_outputs or len(uses) != 1:
            return None
        return uses[0]

    def fanout_reason(self, name: str, what: str) -> str | None:
        """Why `name` (the output of `what`) cannot be rewired, or None if it has one reader."""
        if name in self.graph_outputs:
            return f"the {what} output is a graph output"
        count = len(self.uses.get(name, []))
        if count > 1:
            return f"the {what} output also feeds {count - 1} other node(s)"
        return None

    def rank(self, name: str) -> int | None:
        info = self.tensor_info.get(name)
        return None if info is None else info.rank

    def shape(self, name: str) -> TensorShape | None:
        info = self.tensor_info.get(name)
        return None if info is None else info.shape

    def elem_type(self, name: str) -> int | None:
        info = self.tensor_info.get(name)
        if info is not None and info.elem_type:
            return info.elem_type
        if name in self.initializers:
            return self.initializers[name].data_type
        return None

    def unique_name(self, base: str) -> str:
        """A tensor/node name not yet used anywhere in the graph (and reserve it)."""
        if self._names is None:
            self._names = set(self.initializers) | set(self.graph_inputs) | self.graph_outputs
            for node in self.nodes:
                self._names.update(node.input)
                self._names.update(node.output)
                self._names.add(node.name)
        candidate, counter = base, 0
        while candidate in self._names:
            counter += 1
            candidate = f"{base}_{counter}"
        self._names.add(candidate)
        return candidate

    # -- constants ---------------------------------------------------------------------------

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is constant (see the module docstring), else None."""
        if not name:
            return None
        if name not in self._constants:
            self._constants[name] = self._evaluate_constant(name)
        return self._constants[name]

    def not_constant_reason(self, name: str, what: str) -> str:
        """Why `what` (tensor `name`) cannot be read as a constant, for a kept BN's reason."""
        if name in self.overridable:
            return (
                f"{what} {name!r} is an overridable graph input (an initializer also listed "
                "in graph.input), so it is not a constant"
            )
        return f"{what} is not constant"

    def _evaluate_constant(self, name: str) -> np.ndarray | None:
        if name in self.overridable:
            return None
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer_of(name)
        if node is None:
            return None
        if node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS:
            return self.constant(node.input[0])
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        closure = self._constant_closure(name)
        if closure is None:
            return None
        return self._run_closure(closure, name)

    def _constant_closure(self, name: str) -> list[int] | None:
        """Indices of the nodes computing `name` from initializers alone, or None."""
        needed: set[int] = set()
        pending = [name]
        while pending:
            tensor = pending.pop()
            if tensor in self.overridable:
                return None
            if tensor in self.initializers or not tensor:
                continue
            index = self.producer.get(tensor)
            if index is None:
                return None
            if index in needed:
                continue
            node = self.nodes[index]
            if (
                node.domain not in _DEFAULT_DOMAINS
                or node.op_type in _NONDETERMINISTIC_OPS
                or has_subgraph(node)
            ):
                return None
            needed.add(index)
            if len(needed) > _MAX_CONSTANT_CLOSURE:
                return None
            pending.extend(node.input)
        return sorted(needed)

    def _run_closure(self, closure: list[int], name: str) -> np.ndarray | None:
        nodes = [self.nodes[index] for index in closure]
        read = {tensor for node in nodes for tensor in node.input}
        graph = onnx.helper.make_graph(
            nodes,
            "constant",
            [],
            [onnx.helper.make_empty_tensor_value_info(name)],
            [self.initializers[tensor] for tensor in sorted(read) if tensor in self.initializers],
        )
        model = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
        try:
            # imported here: its op table costs a server 13 MB it never needs
            from onnx.reference import ReferenceEvaluator

            (value,) = ReferenceEvaluator(model).run(None, {})
        except Exception:
            return None
        return np.asarray(value)


@dataclass
class GraphEdit:
    """A batch of node replacements and new initializers, applied at once by `apply_edit`.

    `released` names tensors a rewrite stopped reading; after the edit they are
    removed, with the nodes and initializers that only served them.
    """

    replacements: dict[int, list[NodeProto]] = field(default_factory=dict)
    initializers: list[TensorProto] = field(default_factory=list)
    released: set[str] = field(default_factory=set)

    def replace(self, index: int, nodes: Iterable[NodeProto]) -> None:
        if index in self.replacements:
            raise RuntimeError(f"node {index} is rewritten twice in one pass")
        self.replacements[index] = list(nodes)

    def remove(self, index: int) -> None:
        self.replace(index, [])

    def add_initializer(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def release(self, names: Iterable[str]) -> None:
        self.released.update(name for name in names if name)


def apply_edit(model: ModelProto, edit: GraphEdit) -> None:
    """Rebuild the node list with the replacements, add initializers, drop orphans."""
    graph = model.graph
    rebuilt: list[NodeProto] = []
    for index, node in enumerate(graph.node):
        rebuilt.extend(edit.replacements.get(index, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    add_initializers(model, edit.initializers)
    remove_orphans(model, edit.released)


def add_initializers(model: ModelProto, tensors: Iterable[TensorProto]) -> None:
    """Add initializers; before IR 4 each is listed among the graph inputs too, as IR 3 requires."""
    added = list(tensors)
    model.graph.initializer.extend(added)
    if model.ir_version < OVERRIDABLE_INITIALIZERS_IR_VERSION:
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            for tensor in added
        )


def remove_orphans(model: ModelProto, candidates: Iterable[str]) -> None:
    """Remove candidate tensors nobody reads: their initializers, or their producing nodes.

    Removal cascades to the inputs of a removed node, so the Identity/Constant
    chains that only fed a replaced weight disappear too; nothing the edit did
    not release is touched.
    """
    graph = model.graph
    pending = set(candidates)
    while pending:
        index = GraphIndex(model, {})
        initializer_names = set(index.initializers)
        removable_nodes: set[int] = set()
        next_pending: set[str] = set()
        unused_initializers: set[str] = set()
        for name in pending:
            if index.is_used(name):
                continue
            producer = index.producer.get(name)
            if producer is not None:
                node = index.nodes[producer]
                if not any(index.is_used(output) for output in node.output if output):
                    removable_nodes.add(producer)
                    next_pending.update(n for n in node.input if n)
                    next_pending |= subgraph_free_names(node)
            elif name in initializer_names:
                unused_initializers.add(name)
        _remove_initializers(graph, unused_initializers)
        if removable_nodes:
            kept = [node for i, node in enumerate(graph.node) if i not in removable_nodes]
            del graph.node[:]
            graph.node.extend(kept)
        pending = next_pending


def _remove_initializers(graph: GraphProto, names: set[str]) -> None:
    """Delete in place: rebuilding the repeated field would copy every weight."""
    for field_values in (graph.initializer, graph.input):
        # IR < 4 lists initializers among the inputs; a stale entry would be a required input.
        for position in reversed(range(len(field_values))):
            if field_values[position].name in names:
                del field_values[position]


def copy_node(node: NodeProto) -> NodeProto:
    return copy.deepcopy(node)


def renamed_input(node: NodeProto, old: str, new: str) -> NodeProto:
    """A copy of `node` reading `new` wherever it read `old`."""
    result = copy_node(node)
    for slot, name in enumerate(result.input):
        if name == old:
            result.input[slot] = new
    return result


def name_nodes_uniquely(graph: GraphProto) -> None:
    """Give every nameless or duplicate-named node a unique name, so reports can point at it.

    Nameless nodes become `<op>_<index>` (the BN layer names of the manifest);
    a repeated name gets a `_<k>` suffix. Node names carry no semantics.
    """
    taken: set[str] = set()
    for index, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{index}"
        candidate, counter = base, 0
        while candidate in taken:
            counter += 1
            candidate = f"{base}_{counter}"
        node.name = candidate
        taken.add(candidate)


def iter_nodes(graph: GraphProto, op_type: str) -> Iterator[tuple[int, NodeProto]]:
    """(index, node) for each default-domain node of `op_type`, in graph order."""
    for index, node in enumerate(graph.node):
        if node.op_type == op_type and node.domain in _DEFAULT_DOMAINS:
            yield index, node


BATCH_DIM_PARAM = "batch"


def free_batch_axis(model: ModelProto, pinned: int, *, keep: Iterable[str] = ()) -> bool:
    """Make axis 0 of every graph input and output pinned to `pinned` symbolic ("batch").

    Initializers listed as inputs and the outputs named in `keep` (per-channel
    statistics, which have no batch axis) keep their shapes. Intermediate
    `value_info` is dropped: it may repeat the pinned size, and onnxruntime
    infers it again anyway. Returns whether anything changed.
    """
    changed = False
    fixed = {tensor.name for tensor in model.graph.initializer} | set(keep)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in fixed:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == pinned:
            dims[0].dim_param = BATCH_DIM_PARAM
            changed = True
    if changed:
        del model.graph.value_info[:]
    return changed
