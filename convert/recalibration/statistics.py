"""New running statistics from calibration data, by running the package's graphs in onnxruntime.

Two methods, both pooling exactly in float64 (`bnfold.bn_statistics`): every
run of a chunk contributes (count, mean, M2) per channel, combined by Chan's
formula, so pooling adds no error whatever the chunk sizes: the result is the
population mean and the unbiased variance (divide by count - 1) of all the
values a BN saw.

* `sequential` (the default): each BN's new statistics are those of its input
  in eval mode, with every BN upstream already normalising with *its* new
  statistics: exactly what the recalibrated model will see. calibration.onnx
  runs once per BN-dependency depth (`passes`), each pass pruned to the layers
  of that depth and fed the new statistics of the shallower ones. The chunk size
  changes only the memory used, not the result.
* `batch`: the classic "precise BN" estimate (fvcore's PreciseBN, AIMET's
  re-estimation): train.onnx, where every BN normalises each chunk with the
  chunk's own statistics (Dropout stays off), and the chunks' batch statistics
  pooled exactly (not torch's average of per-batch variances). Later layers
  therefore see train-mode activations, and the chunk size matters.

The two agree when BN inputs do not depend on other BNs' statistics (depth 0
only), and with a single chunk holding all the data they differ only by the
biased/unbiased normaliser upstream. Otherwise `sequential` matches eval mode
exactly and `batch` approximates it, the better the larger the chunks.

The data runs in ceil(N / batch size) chunks of as equal sizes as possible
(none larger than the batch size): 65 samples at batch size 64 run as 32 and
33, not as 64 and a lone sample whose batch variance (`batch`) would be zero.
A model whose batch axis is fixed at b runs in chunks of b.

The before/after drift needs one more pass each: *before* is the data's
eval-mode input statistics under the package's running statistics (the first
pass, which also gives the depth-0 layers' new statistics), *after* the same
under the new ones (for `sequential` these are the estimate's own passes).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import onnxruntime
from onnx import ModelProto
from onnx.external_data_helper import load_external_data_for_model

from bnfold.bn_statistics import ChannelMoments, pool
from bnfold.convert.errors import CalibrationDataError, NotRecalibratable, first_line
from bnfold.convert.onnx.io import fits_in_one_proto, save_model
from bnfold.convert.recalibration.passes import layer_depths, pruned
from bnfold.package_format import (
    batch_stat_output_names,
    input_stat_output_names,
    running_stat_input_names,
)

Method = Literal["sequential", "batch"]
METHODS: tuple[Method, ...] = ("sequential", "batch")
DEFAULT_BATCH_SIZE = 64

Feed = dict[str, np.ndarray]


class RunProgress(Protocol):
    """Told about each step, and within a step about each chunk run (`completed` of `total`)."""

    def __call__(
        self, label: str, completed: int | None = None, total: int | None = None
    ) -> None: ...


def no_run_progress(label: str, completed: int | None = None, total: int | None = None) -> None:
    """The progress callback of a recalibration nobody watches."""


@dataclass(frozen=True)
class LayerEstimate:
    """One BN layer: its depth, its input's statistics before and after, the new statistics."""

    name: str
    depth: int
    before: ChannelMoments
    after: ChannelMoments
    running_mean: np.ndarray
    running_var: np.ndarray


@dataclass(frozen=True)
class Estimate:
    """Every layer's estimate (in the order asked), and how many passes over the data ran."""

    layers: dict[str, LayerEstimate]
    passes: int


def chunk_bounds(samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of ceil(samples / batch_size) chunks of as equal sizes as possible."""
    count = math.ceil(samples / batch_size)
    edges = [position * samples // count for position in range(count + 1)]
    return list(itertools.pairwise(edges))


def chunk_feeds(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[Feed]:
    """The data as feeds of at most `batch_size` samples (views, no copies)."""
    samples = int(next(iter(arrays.values())).shape[0])
    return [
        {name: array[start:stop] for name, array in arrays.items()}
        for start, stop in chunk_bounds(samples, batch_size)
    ]


class SessionFactory:
    """onnxruntime CPU sessions for the pass graphs; `threads` caps intra-op threads (None:
    onnxruntime's default). Graphs over the protobuf limit go through `scratch` on disk."""

    def __init__(self, threads: int | None, scratch: Path) -> None:
        self.options = onnxruntime.SessionOptions()
        # Overridable initializers are the point of calibration.onnx: not worth a warning each.
        self.options.log_severity_level = 3
        if threads is not None:
            self.options.intra_op_num_threads = threads
        self.scratch = scratch

    def session(self, model: ModelProto, what: str) -> onnxruntime.InferenceSession:
        try:
            if fits_in_one_proto(model):
                return self._open(model.SerializeToString())
            path = self.scratch / "pass.onnx"
            save_model(model, path, external=True, check=False)
            try:
                return self._open(str(path))
            finally:
                # Saving moved the weights out of `model`: put them back for the next pass.
                load_external_data_for_model(model, str(self.scratch))
        except Exception as error:
            raise NotRecalibratable(
                f"onnxruntime cannot load {what}: {first_line(error)}"
            ) from error

    def _open(self, content: bytes | str) -> onnxruntime.InferenceSession:
        return onnxruntime.InferenceSession(
            content, self.options, providers=["CPUExecutionProvider"]
        )


def estimate(
    calibration: ModelProto,
    train: Callable[[], ModelProto],
    layers: Sequence[str],
    chunks: Sequence[Feed],
    *,
    method: Method,
    sessions: SessionFactory,
    progress: RunProgress = no_run_progress,
) -> Estimate:
    """New statistics of `layers` (manifest order) from the data in `chunks`.

    `train` loads train.onnx, called for the `batch` method only. Raises
    CalibrationDataError when a layer would see fewer than 2 values per channel
    (no unbiased variance), overall or (`batch`) in one chunk, or when the model
    does not run on the data; NotRecalibratable when a graph lacks a layer.
    """
    try:
        depths = layer_depths(calibration, layers)
    except ValueError as error:
        raise NotRecalibratable(f"calibration.onnx does not match the manifest: {error}") from None
    outputs = [name for layer in layers for name in input_stat_output_names(layer)]
    full = pruned(calibration, outputs)
    progress("measure")
    # One session at a time, each dropped when done: a session's memory arena grows to the
    # activations of a chunk.
    before = measure_inputs(
        sessions.session(full, "calibration.onnx"), chunks, layers, {}, progress, "measure"
    )
    samples = sum(_rows(chunk) for chunk in chunks)
    _require_variances(before, samples)
    if method == "sequential":
        new = _sequential(calibration, depths, before, chunks, sessions, progress)
        after, passes = new, 1 + max(depths.values())
    else:
        new = _batch(train(), layers, before, samples, chunks, sessions, progress)
        progress("check")
        overrides = _overrides({layer: _unbiased(new[layer]) for layer in layers})
        session = sessions.session(full, "calibration.onnx")
        after, passes = measure_inputs(session, chunks, layers, overrides, progress, "check"), 3
    return Estimate(
        {
            layer: LayerEstimate(
                layer, depths[layer], before[layer], after[layer], *_unbiased(new[layer])
            )
            for layer in layers
        },
        passes,
    )


def measure_inputs(
    session: onnxruntime.InferenceSession,
    chunks: Sequence[Feed],
    layers: Sequence[str],
    overrides: Mapping[str, np.ndarray],
    progress: RunProgress,
    label: str,
    *,
    offset: int = 0,
    total: int | None = None,
) -> dict[str, ChannelMoments]:
    """The pooled input statistics of `layers` over all chunks, with the running statistics
    in `overrides` fed instead of the graph's defaults (those the pruned graph reads)."""
    outputs = [name for layer in layers for name in input_stat_output_names(layer)]
    pooled: dict[str, list[ChannelMoments]] = {layer: [] for layer in layers}
    for position, chunk in enumerate(chunks):
        values = _run(session, {**chunk, **overrides}, outputs)
        for layer_index, layer in enumerate(layers):
            mean, variance, count = values[3 * layer_index : 3 * layer_index + 3]
            pooled[layer].append(ChannelMoments.from_run(mean, variance, int(count)))
        progress(label, offset + position + 1, total or len(chunks))
    return {layer: pool(runs) for layer, runs in pooled.items()}


def _sequential(
    calibration: ModelProto,
    depths: Mapping[str, int],
    before: Mapping[str, ChannelMoments],
    chunks: Sequence[Feed],
    sessions: SessionFactory,
    progress: RunProgress,
) -> dict[str, ChannelMoments]:
    """Each layer's eval-mode input statistics with every shallower layer's new statistics:
    depth 0 from the first pass, then one pruned pass per depth."""
    estimated = {layer: before[layer] for layer, depth in depths.items() if depth == 0}
    deepest = max(depths.values())
    progress("estimate")
    for depth in range(1, deepest + 1):
        level = [layer for layer, layer_depth in depths.items() if layer_depth == depth]
        outputs = [name for layer in level for name in input_stat_output_names(layer)]
        session = sessions.session(
            pruned(calibration, outputs), f"calibration.onnx (depth {depth})"
        )
        overrides = _overrides({layer: _unbiased(moments) for layer, moments in estimated.items()})
        estimated |= measure_inputs(
            session,
            chunks,
            level,
            overrides,
            progress,
            "estimate",
            offset=(depth - 1) * len(chunks),
            total=deepest * len(chunks),
        )
    return estimated


def _batch(
    train: ModelProto,
    layers: Sequence[str],
    before: Mapping[str, ChannelMoments],
    samples: int,
    chunks: Sequence[Feed],
    sessions: SessionFactory,
    progress: RunProgress,
) -> dict[str, ChannelMoments]:
    """The chunks' train-mode batch statistics, pooled exactly. train.onnx reports no counts:
    a layer's values per sample (its spatial size) come from calibration.onnx's counts."""
    per_sample = {layer: before[layer].count // samples for layer in layers}
    smallest = min(_rows(chunk) for chunk in chunks)
    for layer in layers:
        if smallest * per_sample[layer] < 2:
            raise CalibrationDataError(
                f"method batch normalises each chunk with its own statistics, and layer {layer} "
                f"sees {smallest * per_sample[layer]} value per channel in a chunk of "
                f"{smallest} sample: use a --batch-size of at least {math.ceil(2 / per_sample[layer])}"
            )
    outputs = [name for layer in layers for name in batch_stat_output_names(layer)]
    session = sessions.session(pruned(train, outputs), "train.onnx")
    pooled: dict[str, list[ChannelMoments]] = {layer: [] for layer in layers}
    progress("estimate")
    for position, chunk in enumerate(chunks):
        values = _run(session, chunk, outputs)
        for layer_index, layer in enumerate(layers):
            mean, variance = values[2 * layer_index : 2 * layer_index + 2]
            count = _rows(chunk) * per_sample[layer]
            pooled[layer].append(ChannelMoments.from_run(mean, variance, count))
        progress("estimate", position + 1, len(chunks))
    return {layer: pool(runs) for layer, runs in pooled.items()}


def _require_variances(measured: Mapping[str, ChannelMoments], samples: int) -> None:
    """CalibrationDataError unless every layer saw at least 2 values per channel."""
    for layer, moments in measured.items():
        if moments.count < 2:
            per_sample = moments.count // samples
            raise CalibrationDataError(
                f"layer {layer} sees {moments.count} value per channel in {samples} sample; an "
                f"unbiased variance needs 2: give at least {math.ceil(2 / per_sample)} samples"
            )


def _run(
    session: onnxruntime.InferenceSession, feed: Mapping[str, np.ndarray], outputs: Sequence[str]
) -> list[np.ndarray]:
    names = {value.name for value in session.get_inputs()} | {
        value.name for value in session.get_overridable_initializers()
    }
    try:
        return session.run(list(outputs), {name: feed[name] for name in names if name in feed})
    except Exception as error:
        shapes = ", ".join(f"{name} {feed[name].shape}" for name in sorted(names) if name in feed)
        raise CalibrationDataError(
            f"the model does not run on the calibration data ({shapes}): {first_line(error)}"
        ) from error


def _overrides(statistics: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Feed:
    """Running statistics as calibration.onnx's float32 inputs."""
    feed: Feed = {}
    for layer, values in statistics.items():
        for name, value in zip(running_stat_input_names(layer), values, strict=True):
            feed[name] = np.asarray(value, np.float32)
    return feed


def _unbiased(moments: ChannelMoments) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased variance): what a BN's running statistics hold."""
    return moments.mean, moments.variance(unbiased=True)


def _rows(feed: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feed.values())).shape[0])
