"""Warm-up: which runs each version makes before it reports READY, as Triton's model warmup.

A session's first runs pay for what onnxruntime sets up lazily: its memory
arena grows to the run's tensors, kernels pick their buffers, the intra-op
threads wake. Left to the first requests, that cost lands on a client;
warm-up pays it while loading (`sessions.warm_up` runs the plan, the
registry reports READY only after it; `--no-warmup` skips it). Measured in
BENCHMARKS.md (benchmarks/warmup_bench.py).

The plan (`plan_warmup`), pure: one run of zeros per entry.

    model.onnx        max_batch_size rows, each preferred batch size, 1 row:
                      the sizes the batcher runs, largest first (the arena
                      grows once, to the largest; the last run has the
                      one-row shape most first requests have: measured on a
                      32 MB-a-row graph, a first one-row run after warm-ups at
                      2 then 1 rows took 1.1-1.5x a steady run, after 1 then
                      2 rows 2.2x)
    train.onnx        2 rows: compare's smallest batch with statistics for
                      every BatchNorm (compare never batches)
    calibration.onnx  1 row, when the drift monitor has the session

Inputs are zeros of each input's manifest datatype and shape: a leading -1
(the batch axis) at the run's rows, any other -1 at 1. A model without a
batch axis on every input runs each graph once, at its declared shape (rows
are then what the shape says, `rows` 1 meaning "as declared").

No run's inputs exceed `max_bytes`, the largest request body the server
accepts (`--max-body-bytes`): a size above it is warmed at the most rows
that fit, and a model one row of which does not fit (a declared dimension
of 10**12: tests/reliability's `huge`) is not warmed at all, as no request
can bring it one row either. Warm-up never allocates what a request could
not make the server allocate.

What a failing run means is decided where the runs are made
(`sessions.warm_up`): model.onnx or train.onnx failing makes the version
UNAVAILABLE with the reason (it would fail a client's request, or a merged
batch), calibration.onnx failing only turns drift monitoring off for it (the
monitor is an observer, as when the graph cannot be opened).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.package_format import (
    CALIBRATION_GRAPH,
    DATATYPES,
    EVAL_GRAPH,
    TRAIN_GRAPH,
    ManifestTensor,
)
from bnfold.service.batch_policy import BatchPolicy

#: compare's smallest batch whose BatchNorm statistics are defined for every layer kind
#: (a (N, C) BatchNorm needs two rows: `compare.check_batch_has_statistics`).
COMPARE_ROWS = 2


@dataclass(frozen=True)
class WarmupRun:
    """One warm-up run: `graph` (a package file name) on zeros of `rows` rows."""

    graph: str
    rows: int


def has_batch_axis(inputs: Sequence[ManifestTensor]) -> bool:
    """Every input's first dimension is the dynamic batch axis (-1)."""
    return bool(inputs) and all(tensor.shape and tensor.shape[0] == -1 for tensor in inputs)


def plan_warmup(
    policy: BatchPolicy,
    inputs: Sequence[ManifestTensor],
    *,
    calibration: bool,
    max_bytes: int,
) -> tuple[WarmupRun, ...]:
    """The warm-up runs of one version, in order (the module docstring says why these)."""
    batched = has_batch_axis(inputs)
    fitting = max_bytes // max(1, feeds_bytes(inputs, 1))
    if not fitting:
        return ()
    eval_rows = {1}
    if batched and policy.batching:
        eval_rows |= {*policy.preferred_batch_sizes, policy.max_batch_size}
    if batched:
        eval_rows = {min(rows, fitting) for rows in eval_rows}
    runs = [WarmupRun(EVAL_GRAPH, rows) for rows in sorted(eval_rows, reverse=True)]
    runs.append(WarmupRun(TRAIN_GRAPH, min(COMPARE_ROWS, fitting) if batched else 1))
    if calibration:
        runs.append(WarmupRun(CALIBRATION_GRAPH, 1))
    return tuple(runs)


def warmup_shape(tensor: ManifestTensor, rows: int) -> tuple[int, ...]:
    """`tensor`'s shape for a run of `rows` rows: the batch axis at `rows`, other -1 at 1."""
    return tuple(
        rows if index == 0 and dim == -1 else (1 if dim == -1 else dim)
        for index, dim in enumerate(tensor.shape)
    )


def feeds_bytes(inputs: Sequence[ManifestTensor], rows: int) -> int:
    """Bytes of `zero_feeds(inputs, rows)`, computed without allocating them."""
    return sum(
        math.prod(warmup_shape(tensor, rows)) * DATATYPES[tensor.datatype].itemsize
        for tensor in inputs
    )


def zero_feeds(inputs: Sequence[ManifestTensor], rows: int) -> dict[str, np.ndarray]:
    """Zeros for every input, of its manifest datatype, for a run of `rows` rows."""
    return {
        tensor.name: np.zeros(warmup_shape(tensor, rows), dtype=DATATYPES[tensor.datatype])
        for tensor in inputs
    }


def describe_runs(runs: Sequence[WarmupRun]) -> str:
    """`model.onnx at batch 32, 1; train.onnx at batch 2`: for the log."""
    if not runs:
        return "no run (one row of input is larger than the largest request body)"
    graphs: dict[str, list[str]] = {}
    for run in runs:
        graphs.setdefault(run.graph, []).append(str(run.rows))
    return "; ".join(f"{graph} at batch {', '.join(rows)}" for graph, rows in graphs.items())


def triton_model_warmup(
    runs: Sequence[WarmupRun], inputs: Sequence[ManifestTensor]
) -> list[dict[str, Any]]:
    """The model.onnx runs as Triton's `model_warmup` config field describes warm-up samples.

    bnfold's config keeps `max_batch_size` 0 (its dims keep the batch axis), and
    for such a model Triton's `batch_size` is 1 with the rows inside `dims`: so
    each entry is one request of the full zero tensors, `count` 1.
    """
    return [
        {
            "name": f"zeros_{run.rows}_rows",
            "batch_size": 1,
            "count": 1,
            "inputs": {
                tensor.name: {
                    "data_type": f"TYPE_{tensor.datatype}",
                    "dims": list(warmup_shape(tensor, run.rows)),
                    "zero_data": True,
                }
                for tensor in inputs
            },
        }
        for run in runs
        if run.graph == EVAL_GRAPH
    ]
