"""Verifying an ONNX conversion with onnxruntime, by the rule of `convert.verify`.

* model.onnx against the original file, both in onnxruntime. The original
  runs with graph optimizations off, so the reference is the graph as written
  (onnxruntime's own Conv+BN fusion would otherwise fold it first); the
  folded model runs fully optimized, as the service runs it.
* train.onnx against `TrainReference` (original nodes, BNs in numpy with batch
  statistics), outputs and per-BN batch mean/var together.
* calibration.onnx against `InputStatisticsReference` (the original graph, each
  layer's BN input taken out and summarised in numpy): outputs and per-layer
  input mean/var/count together.

Inputs are seeded random batches shaped from the graph inputs: float inputs
standard normal, integer inputs 0/1, booleans random; a symbolic batch axis
takes the sizes of the shared policy (`convert.verify`), other symbolic axes `FREE_DIM`, or the sizes
`--input-shape` gives them (`pin_input_shape`). `--sample` adds the user's own
batch. No batch may hold more than `MAX_BATCH_VALUES` values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from onnx import ModelProto, helper

from bnfold.convert.errors import InputShapeError
from bnfold.convert.onnx.graph import Dim
from bnfold.convert.onnx.reference import ERRORS_ONLY, InputStatisticsReference, TrainReference
from bnfold.convert.verify import (
    VERIFY_SEED,
    Agreement,
    check_batch_size,
    verification_batch_sizes,
)

FREE_DIM = 16

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input as declared: name, numpy dtype, dims (int, symbolic str, or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def fixed_batch(self) -> int | None:
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) and first > 0 else None


def input_specs(model: ModelProto) -> list[InputSpec]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims: tuple[Dim, ...] = tuple(
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in tensor_type.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def pin_input_shape(specs: Sequence[InputSpec], input_shape: Sequence[int]) -> list[InputSpec]:
    """The specs with the symbolic axes of the one input set from `--input-shape`.

    Axis 0 is the batch axis, verified at the shared policy's batch sizes (or the
    source's fixed batch size) whatever `input_shape` says; every other axis
    must equal a fixed size or names the size of a symbolic one. Only the
    verification batches change: the package keeps the source's symbolic axes.
    """
    shape_text = ",".join(map(str, input_shape))
    if len(specs) != 1:
        raise InputShapeError(
            f"--input-shape {shape_text} gives one shape but the model has {len(specs)} inputs "
            f"({', '.join(spec.name for spec in specs)})"
        )
    spec = specs[0]
    declared = ", ".join(str(dim) if isinstance(dim, int) else "?" for dim in spec.shape)
    if len(input_shape) != len(spec.shape):
        raise InputShapeError(
            f"--input-shape {shape_text} has {len(input_shape)} axes; input {spec.name} has "
            f"{len(spec.shape)}: ({declared})"
        )
    pinned: list[Dim] = [spec.shape[0]]
    for axis, (dim, size) in enumerate(zip(spec.shape, input_shape, strict=True)):
        if axis == 0:
            continue
        if isinstance(dim, int) and dim > 0 and dim != size:
            raise InputShapeError(
                f"--input-shape {shape_text} sets axis {axis} to {size}; input {spec.name} "
                f"fixes it at {dim}: ({declared})"
            )
        pinned.append(size)
    return [InputSpec(spec.name, spec.dtype, tuple(pinned))]


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size the source is pinned to, if any input has a fixed axis 0."""
    sizes = {spec.fixed_batch for spec in specs if spec.fixed_batch is not None}
    return min(sizes) if sizes else None


def random_feed(specs: Sequence[InputSpec], batch: int, seed: int) -> Feed:
    generator = np.random.default_rng(seed)
    feed: Feed = {}
    for spec in specs:
        shape = [
            dim if isinstance(dim, int) and dim > 0 else (batch if axis == 0 else FREE_DIM)
            for axis, dim in enumerate(spec.shape)
        ]
        check_batch_size(shape, spec.dtype, f"input {spec.name}")
        if np.issubdtype(spec.dtype, np.floating):
            values = generator.standard_normal(shape)
        elif spec.dtype == np.bool_:
            values = generator.random(shape) < 0.5
        else:
            values = generator.integers(0, 2, shape)
        feed[spec.name] = np.ascontiguousarray(values.astype(spec.dtype))
    return feed


def sample_feed(specs: Sequence[InputSpec], sample: np.ndarray) -> Feed:
    """The user's `--sample` as a feed for a single-input model; InputShapeError if it cannot be."""
    if len(specs) != 1:
        raise InputShapeError(
            f"--sample gives one array but the model has {len(specs)} inputs "
            f"({', '.join(spec.name for spec in specs)})"
        )
    spec = specs[0]
    if not np.issubdtype(sample.dtype, np.number) and sample.dtype != np.bool_:
        raise InputShapeError(f"--sample must hold numbers, got dtype {sample.dtype}")
    if sample.ndim == len(spec.shape) - 1:
        sample = sample[np.newaxis]
    fits = sample.ndim == len(spec.shape) and all(
        not isinstance(dim, int) or dim <= 0 or size == dim
        for dim, size in zip(spec.shape, sample.shape, strict=True)
    )
    if not fits:
        expected = ", ".join(str(dim) if isinstance(dim, int) else "?" for dim in spec.shape)
        raise InputShapeError(
            f"--sample has shape {sample.shape}; input {spec.name} is ({expected})"
        )
    return {spec.name: np.ascontiguousarray(sample.astype(spec.dtype))}


def row_values(specs: Sequence[InputSpec]) -> int:
    """Values in one row of all inputs (symbolic non-batch axes at `FREE_DIM`)."""
    return sum(
        math.prod(dim if isinstance(dim, int) and dim > 0 else FREE_DIM for dim in spec.shape[1:])
        for spec in specs
    )


def verification_feeds(specs: Sequence[InputSpec], sample: np.ndarray | None) -> list[Feed]:
    """Seeded random batches (the shared batch-size policy, or the pinned batch size), then
    the sample."""
    pinned = fixed_batch(specs)
    policy = verification_batch_sizes(row_values(specs))
    sizes = [pinned] * len(policy) if pinned else list(policy)
    feeds = [
        random_feed(specs, size, VERIFY_SEED + position) for position, size in enumerate(sizes)
    ]
    if sample is not None:
        feeds.append(sample_feed(specs, sample))
    return feeds


def session(path: Path, *, optimized: bool) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = ERRORS_ONLY
    options.graph_optimization_level = (
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_reference(reference: onnxruntime.InferenceSession, feed: Feed) -> list[np.ndarray]:
    """Run the original; a failure means bnfold guessed the inputs wrong, not a bad fold."""
    try:
        return reference.run(None, feed)
    except Exception as error:
        shapes = ", ".join(f"{name} {value.shape}" for name, value in feed.items())
        raise InputShapeError(
            f"the original model does not run on inputs of shape {shapes}: "
            f"{str(error).strip().splitlines()[0]}; pass a real batch with --sample"
        ) from error


def verify_eval(
    reference: onnxruntime.InferenceSession, folded_path: Path, feeds: Sequence[Feed]
) -> Agreement:
    folded = session(folded_path, optimized=True)
    names = [output.name for output in reference.get_outputs()]
    agreement = Agreement()
    for position, feed in enumerate(feeds):
        expected = run_reference(reference, feed)
        actual = folded.run(names, feed)
        agreement.add(f"eval batch {position} (N={_rows(feed)})", actual, expected)
    return agreement


def verify_batch_growth(
    reference: onnxruntime.InferenceSession,
    paths: Sequence[Path],
    specs: Sequence[InputSpec],
    pinned: int,
) -> str | None:
    """Check graphs whose batch axis was freed from `pinned` on two batches' worth of rows.

    The first path (model.onnx) must equal the original run on each half; the
    others (train.onnx) must run. Returns why not, or None.
    """
    halves = [random_feed(specs, pinned, VERIFY_SEED + 100 + half) for half in range(2)]
    doubled = {name: np.concatenate([half[name] for half in halves]) for name in halves[0]}
    expected_halves = [run_reference(reference, half) for half in halves]
    if any(output.ndim == 0 or output.shape[0] != pinned for output in expected_halves[0]):
        return "an output has no batch axis 0"
    expected = [np.concatenate(pair) for pair in zip(*expected_halves, strict=True)]
    try:
        actual = session(paths[0], optimized=True).run(None, doubled)
        for path in paths[1:]:
            session(path, optimized=True).run(None, doubled)
    except Exception as error:
        return f"the graph does not run with batch {2 * pinned}: {str(error).splitlines()[0]}"
    agreement = Agreement()
    agreement.add(f"batch {2 * pinned}", actual[: len(expected)], expected)
    return None if agreement.passed else "; ".join(agreement.failures)


def verify_train(reference: TrainReference, train_path: Path, feeds: Sequence[Feed]) -> Agreement:
    """train.onnx's outputs and statistics against the train reference, per batch."""
    train = session(train_path, optimized=True)
    agreement = Agreement()
    for position, feed in enumerate(feeds):
        expected = reference.run(feed)
        actual = train.run(None, feed)
        label = f"train batch {position} (N={_rows(feed)})"
        agreement.add(label, actual, [*expected.outputs, *expected.statistics])
    return agreement


def verify_calibration(
    reference: InputStatisticsReference, calibration_path: Path, feeds: Sequence[Feed]
) -> Agreement:
    """calibration.onnx fed the model inputs alone (its running statistics at their defaults):
    the eval outputs and every layer's input mean, variance and count, per batch."""
    calibration = session(calibration_path, optimized=True)
    agreement = Agreement()
    for position, feed in enumerate(feeds):
        expected = reference.run(feed)
        actual = calibration.run(None, feed)
        agreement.add(f"calibration batch {position} (N={_rows(feed)})", actual, expected)
    return agreement


def _rows(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1
