"""Emitting the standard-op replacements and taps the graph builders add around a BN.

train.onnx (`train_graph`) and calibration.onnx (`calibration_graph`) both
compute per-channel statistics of a BN's input with the same ops; this is the
one place that knows how to spell them for the model's own opset (ReduceMean
takes its axes as an attribute before opset 18 and as an input from 18 on),
and how to name the new nodes and constants so they never collide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from bnfold.convert.onnx.graph import GraphIndex

REDUCE_AXES_AS_INPUT_OPSET = 18


class Emitter:
    """Appends nodes and constants for one BN, with unique names under the BN's scope."""

    def __init__(self, index: GraphIndex, scope: str) -> None:
        self.index = index
        self.scope = scope
        self.nodes: list[NodeProto] = []
        self.constants: list[TensorProto] = []

    def fresh(self, label: str) -> str:
        return self.index.unique_name(f"{self.scope}/{label}")

    def constant(self, label: str, values: np.ndarray) -> str:
        name = self.fresh(label)
        self.constants.append(numpy_helper.from_array(values, name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        result = output or self.fresh(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [result], name=self.fresh(op_type), **attrs)
        )
        return result

    def reduce_mean(self, tensor: str, axes: list[int]) -> str:
        if self.index.opset >= REDUCE_AXES_AS_INPUT_OPSET:
            axes_name = self.constant("axes", np.array(axes, np.int64))
            return self.op("ReduceMean", [tensor, axes_name], keepdims=1)
        return self.op("ReduceMean", [tensor], axes=axes, keepdims=1)

    def as_type(self, name: str, dtype: int) -> str:
        """`name` cast to `dtype` when its type is known to differ (opset 15 allows that)."""
        current = self.index.elem_type(name)
        if current is None or current == dtype:
            return name
        return self.op("Cast", [name], to=dtype)

    def mean_and_variance(self, x: str, rank: int) -> tuple[str, str, str]:
        """(mean, centred, biased variance) of `x` over every axis but 1, kept as [1, C, 1...]:
        the variance is the mean of the squared deviations from the mean, as torch's train
        mode computes it."""
        axes = [0, *range(2, rank)]
        mean = self.reduce_mean(x, axes)
        centred = self.op("Sub", [x, mean])
        var = self.reduce_mean(self.op("Mul", [centred, centred]), axes)
        return mean, centred, var
