"""Running the BN fold passes over one ONNX model, and the report of what they did.

Three pattern families run in order, each on a fresh index of the graph the
previous one left complete:

  1. forward into Conv/ConvTranspose   (patterns/conv_forward.py)
  2. forward into Gemm/MatMul(+Add)    (patterns/dense_forward.py)
  3. backward into Conv/Gemm/MatMul    (patterns/backward.py)

Within a family every match is collected first and applied as one edit, so no
match ever sees a half-rewritten graph. Forward goes first: a BN sitting
between two layers folds into the one before it. The three families repeat
until a round folds nothing, because a fold can expose another: in
Conv ─► BN ─► BN the second BN reads the conv once the first is folded, and
in BN ─► BN ─► Conv the first reaches the conv once the second is.

A BN that no family folds is kept with the reasons from both directions, or
with the guard that stopped it in every direction (training mode, running
statistics read, non-constant parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from onnx import ModelProto

from bnfold.convert.onnx.batchnorm import BatchNormNode, batchnorm_layer, read_batchnorms
from bnfold.convert.onnx.graph import GraphEdit, GraphIndex, TensorInfo, apply_edit
from bnfold.convert.onnx.patterns.backward import apply_backward, find_backward
from bnfold.convert.onnx.patterns.conv_forward import apply_conv_forward, find_conv_forward
from bnfold.convert.onnx.patterns.dense_forward import apply_dense_forward, find_dense_forward
from bnfold.convert.report import BatchNormReport, FoldedBatchNorm, KeptBatchNorm

FORWARD_LAYERS = "Conv/ConvTranspose/Gemm/MatMul"


class FoldMatch(Protocol):
    """One BN a family will fold, and how (what the report records)."""

    @property
    def folded(self) -> FoldedBatchNorm: ...


MatchT = TypeVar("MatchT", bound=FoldMatch)


@dataclass(frozen=True)
class FoldFamily(Generic[MatchT]):
    """One pattern family, onnxruntime's `Fusion` shape without its mutable state.

    `find` collects every match in the graph at once (and why each other BN it
    looked at cannot fold); `apply` turns all of them into one `GraphEdit`, so no
    match ever sees a half-rewritten graph. `name` keys the report's per-family
    counts.
    """

    name: str
    direction: Literal["forward", "backward"]
    find: Callable[[GraphIndex, list[BatchNormNode]], tuple[Sequence[MatchT], dict[str, str]]]
    apply: Callable[[GraphIndex, list[MatchT]], GraphEdit]


CONV_FORWARD: Final = FoldFamily("conv_forward", "forward", find_conv_forward, apply_conv_forward)
DENSE_FORWARD: Final = FoldFamily(
    "dense_forward", "forward", find_dense_forward, apply_dense_forward
)
BACKWARD: Final = FoldFamily("backward", "backward", find_backward, apply_backward)
FAMILIES: Final[tuple[FoldFamily[Any], ...]] = (CONV_FORWARD, DENSE_FORWARD, BACKWARD)


def fold_batchnorms(model: ModelProto, tensor_info: dict[str, TensorInfo]) -> BatchNormReport:
    """Fold every BN that folds exactly, in place; report each BN as folded or kept.

    `model` must have unique node names (the BN layer names). `tensor_info`
    comes from shape inference on the unfolded model; folding keeps every
    surviving tensor's shape, so it stays valid across the passes.
    """
    original = GraphIndex(model, tensor_info)
    batchnorms = read_batchnorms(original)
    layers = [batchnorm_layer(original, bn) for bn in batchnorms]
    report = BatchNormReport(layers=[layer for layer in layers if layer is not None])
    while True:
        reasons: dict[str, dict[str, str]] = {"forward": {}, "backward": {}}
        folded_this_round = 0
        for family in FAMILIES:
            index = GraphIndex(model, tensor_info)
            candidates = [bn for bn in read_batchnorms(index) if bn.blocked is None]
            matches, found_reasons = family.find(index, candidates)
            reasons[family.direction].update(found_reasons)
            apply_edit(model, family.apply(index, list(matches)))
            report.folded.extend(match.folded for match in matches)
            report.by_pattern[family.name] = report.by_pattern.get(family.name, 0) + len(matches)
            folded_this_round += len(matches)
        if not folded_this_round:
            break
    final = GraphIndex(model, tensor_info)
    order = {bn.name: position for position, bn in enumerate(batchnorms)}
    report.folded.sort(key=lambda item: order[item.name])
    for bn in read_batchnorms(final):
        reason = bn.blocked or (
            f"forward: {reasons['forward'].get(bn.name) or _forward_default(final, bn)}; "
            f"backward: {reasons['backward'].get(bn.name, 'not examined')}"
        )
        report.kept.append(KeptBatchNorm(bn.name, reason))
    return report


def _forward_default(index: GraphIndex, bn: BatchNormNode) -> str:
    producer = index.producer_of(bn.input)
    if producer is None:
        return "its input is a graph input"
    return f"its input comes from {producer.op_type}, not {FORWARD_LAYERS}"
