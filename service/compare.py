"""Train-mode vs eval-mode: the statistics of the compare report (pure numpy).

Eval mode normalises every BatchNorm with its running statistics, train mode
with the batch's own; the two graphs of a package differ by that alone. The
report measures the effect on the outputs and, per layer, how far the batch's
statistics sit from the running ones (`bnfold.bn_statistics.drift_measures`,
the same measures the drift monitor reports):

* mean shift: |batch mean - running mean| / sqrt(running var + eps), the
  batch mean's distance in running standard deviations;
* variance ratio: (batch var + eps) / (running var + eps), 1 when they agree.
  eps is added on both sides because it is what BatchNorm divides by, and it
  keeps dead (constant) channels finite;
* KL divergence of N(batch mean, batch var) from N(running mean, running var)
  per channel, 0.5 * (ratio + shift^2 - 1 - ln ratio): one number that grows
  with either kind of disagreement. Layers are sorted by its channel mean,
  worst first.

Batch statistics need more than one value per channel: a (1, C) input to a
BatchNorm1d has none (torch refuses to train on it). The service cannot see
spatial sizes inside the graph, so it uses the manifest's `input_rank`: a layer
on a rank-2 input (or of unknown rank) needs a batch of at least two. A batch
of one through a BatchNorm2d whose spatial size is 1 (after global pooling)
shows up as zero variance in every channel and is refused after the run.

The drill-down (`CompareOptions.channels`) adds each layer's per-channel batch
mean and variance, mean shift and KL: the drift monitor's `channel_drift`,
on the batch instead of a window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.bn_statistics import drift_measures, worst_first
from bnfold.package_format import ManifestLayer
from bnfold.service.drift import channel_drift
from bnfold.service.errors import BadRequest, Unprocessable

_QUERY_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class CompareOptions:
    """What a compare returns besides the report: both modes' outputs, per-channel values.

    A flag is set when the query string or the JSON body sets it (`return_outputs`
    at the top level, `channels` in `parameters`): array bodies have only the query.
    """

    return_outputs: bool = False
    channels: bool = False

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> CompareOptions:
        """`?return_outputs=true&channels=true`; BadRequest for a value not true or false."""
        flags: dict[str, bool] = {}
        for key in ("return_outputs", "channels"):
            value = query.get(key)
            if value is not None and value.lower() not in _QUERY_BOOLEANS:
                raise BadRequest(f"query parameter {key!r} must be true or false, got {value!r}")
            flags[key] = value is not None and _QUERY_BOOLEANS[value.lower()]
        return cls(**flags)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> CompareOptions:
        """From a V2 JSON body: top-level `return_outputs`, `parameters.channels`."""
        return_outputs = fields.get("return_outputs", False)
        if not isinstance(return_outputs, bool):
            raise BadRequest("'return_outputs' must be a boolean")
        channels = (fields.get("parameters") or {}).get("channels", False)
        if not isinstance(channels, bool):
            raise BadRequest("parameter 'channels' must be a boolean")
        return cls(return_outputs, channels)

    def __or__(self, other: CompareOptions) -> CompareOptions:
        return CompareOptions(
            self.return_outputs or other.return_outputs, self.channels or other.channels
        )


def check_batch_has_statistics(layers: Sequence[ManifestLayer], batch_size: int) -> None:
    """Refuse batches whose BatchNorm statistics are undefined, before running anything."""
    if batch_size == 0:
        raise Unprocessable("compare needs a non-empty batch: an empty batch has no statistics")
    if batch_size > 1:
        return
    flat = [layer.name for layer in layers if layer.input_rank in (None, 2)]
    if flat:
        raise Unprocessable(
            "compare needs a batch of at least 2 samples for this model: BatchNorm layers "
            f"{', '.join(flat)} normalise (N, C) inputs, so a batch of one gives one value per "
            "channel and no variance (torch refuses it in train mode too). Send a batch of "
            "several samples."
        )


def layer_drift(
    layer: ManifestLayer, batch_mean: np.ndarray, batch_var: np.ndarray, channels: bool = False
) -> dict[str, Any]:
    """How far one layer's batch statistics are from its running statistics; with
    `channels`, per channel too."""
    try:
        measures = drift_measures(
            layer.running_mean, layer.running_var, layer.eps, batch_mean, batch_var
        )
    except ValueError:
        raise Unprocessable(
            f"layer {layer.name!r}: train.onnx returned {np.asarray(batch_mean).size} channel "
            f"statistics, the manifest has {layer.channels}"
        ) from None
    entry = {"name": layer.name, "channels": layer.channels, **measures}
    if channels:
        entry["channel_statistics"] = channel_drift(
            layer.running_mean, layer.running_var, layer.eps, batch_mean, batch_var
        )
    return entry


def _per_sample(array: np.ndarray, batch_size: int) -> np.ndarray:
    values = array.astype(np.float64)
    if values.ndim >= 1 and values.shape[0] == batch_size:
        return values.reshape(batch_size, -1)
    return values.reshape(1, -1)


def compare_output(name: str, eval_output: np.ndarray, train_output: np.ndarray) -> dict[str, Any]:
    """Difference of one output between the modes, eval (what is served) as the reference.

    The relative L2 difference divides by ||eval||, or by 1 when the eval output
    is all zeros. Cosine similarity is per sample (1 for two zero vectors, 0 when
    only one is zero), averaged; argmax agreement only for (N, K > 1) outputs.
    """
    batch_size = eval_output.shape[0] if eval_output.ndim else 1
    eval_rows = _per_sample(eval_output, batch_size)
    train_rows = _per_sample(train_output, batch_size)
    difference = train_rows - eval_rows
    eval_norm = float(np.linalg.norm(eval_rows))
    eval_lengths = np.linalg.norm(eval_rows, axis=1)
    train_lengths = np.linalg.norm(train_rows, axis=1)
    products = eval_lengths * train_lengths
    both_zero = (eval_lengths == 0) & (train_lengths == 0)
    cosine = np.where(
        products > 0,
        (eval_rows * train_rows).sum(axis=1) / np.where(products > 0, products, 1.0),
        np.where(both_zero, 1.0, 0.0),
    )
    agreement = None
    if eval_output.ndim == 2 and eval_output.shape[1] > 1:
        agreement = float(
            (np.argmax(eval_output, axis=1) == np.argmax(train_output, axis=1)).mean()
        )
    return {
        "name": name,
        "shape": list(eval_output.shape),
        "max_abs_diff": float(np.abs(difference).max(initial=0.0)),
        "mean_abs_diff": float(np.abs(difference).mean()) if difference.size else 0.0,
        "relative_l2_diff": float(np.linalg.norm(difference)) / (eval_norm or 1.0),
        "cosine_similarity": float(cosine.mean()),
        "cosine_similarity_min": float(cosine.min()),
        "argmax_agreement": agreement,
    }


def compare_report(
    output_names: Sequence[str],
    eval_outputs: Sequence[np.ndarray],
    train_outputs: Sequence[np.ndarray],
    layers: Sequence[ManifestLayer],
    statistics: Sequence[np.ndarray],
    batch_size: int,
    channels: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-output comparisons, per-layer drift worst first).

    `statistics` holds each layer's batch mean and batch var, in layer order;
    `channels` adds each layer's per-channel values.
    Raises `Unprocessable` when the train-mode run has no defined statistics.
    """
    statistic_names = [
        name for layer in layers for name in (layer.batch_mean_output, layer.batch_var_output)
    ]
    for name, array in zip(
        [*output_names, *statistic_names], [*train_outputs, *statistics], strict=True
    ):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise Unprocessable(
                f"the train-mode run produced NaN or infinity in {name!r}: the batch "
                "statistics are undefined for this input"
            )
    means, variances = statistics[::2], statistics[1::2]
    if batch_size == 1:
        degenerate = [
            layer.name for layer, var in zip(layers, variances, strict=True) if not var.any()
        ]
        if degenerate:
            raise Unprocessable(
                f"with a batch of one, BatchNorm layers {', '.join(degenerate)} see zero variance "
                "in every channel: one value per channel (spatial size 1) or a constant input, "
                "so the batch statistics are undefined. Send a batch of several samples."
            )
    outputs = [
        compare_output(name, eval_output, train_output)
        for name, eval_output, train_output in zip(
            output_names, eval_outputs, train_outputs, strict=True
        )
    ]
    drift = [
        layer_drift(layer, mean, var, channels)
        for layer, mean, var in zip(layers, means, variances, strict=True)
    ]
    return outputs, worst_first(drift)
