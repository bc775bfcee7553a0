"""Per-channel statistics of a BatchNorm's input: exact pooling and drift measures (numpy only).

Shared by the three places that look at a BN's input distribution: compare (one
request's batch statistics against the running ones), the service's drift
monitor (live traffic pooled over a window) and `bnfold recalibrate` (new
running statistics from calibration data). One definition keeps their numbers
comparable: a layer "drifted" in the monitor by exactly the measure compare
shows for a batch.

Pooling is exact: every run contributes (count, mean, M2 = count x biased
variance) per channel, and two summaries combine with Chan et al.'s parallel
formula, in float64. A batch of one through a (N, C) BatchNorm contributes
count 1 and M2 0, which is what it is; the variance appears once two runs are
pooled. Averaging per-run variances instead (what torch's `update_bn` does
through momentum=None) loses the spread between the runs' means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ChannelMoments:
    """count values per channel, their mean and their sum of squared deviations (M2)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> ChannelMoments:
        return cls(0, np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    @classmethod
    def from_run(cls, mean: np.ndarray, variance: np.ndarray, count: int) -> ChannelMoments:
        """One run's summary from its mean and *biased* variance over `count` values per channel."""
        mean64 = np.asarray(mean, np.float64).reshape(-1)
        m2 = np.asarray(variance, np.float64).reshape(-1) * count
        return cls(int(count), mean64, np.maximum(m2, 0.0))

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    def combine(self, other: ChannelMoments) -> ChannelMoments:
        """Both summaries as one (Chan, Golub and LeVeque's pairwise update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        return ChannelMoments(total, mean, m2)

    def variance(self, *, unbiased: bool = False) -> np.ndarray:
        """Biased (divide by count) or unbiased (count - 1) variance; needs count > 0 (> 1)."""
        divisor = self.count - 1 if unbiased else self.count
        if divisor <= 0:
            raise ValueError(
                f"{self.count} value(s) per channel define no {'unbiased ' if unbiased else ''}variance"
            )
        return self.m2 / divisor


def pool(runs: Sequence[ChannelMoments]) -> ChannelMoments:
    """All runs as one summary (an empty sequence has no channel count: refused)."""
    if not runs:
        raise ValueError("nothing to pool")
    pooled = runs[0]
    for run in runs[1:]:
        pooled = pooled.combine(run)
    return pooled


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def drift_measures(
    running_mean: Sequence[float] | np.ndarray,
    running_var: Sequence[float] | np.ndarray,
    eps: float,
    mean: np.ndarray,
    variance: np.ndarray,
) -> dict[str, Any]:
    """How far (mean, biased variance) of a BN's input sit from its running statistics.

    * mean shift: |mean - running mean| / sqrt(running var + eps), in running stds;
    * variance ratio: (var + eps) / (running var + eps), 1 when they agree; eps on both
      sides because it is what BatchNorm divides by, and it keeps dead channels finite;
    * KL divergence of N(mean, var) from N(running mean, running var) per channel,
      0.5 * (ratio + shift^2 - 1 - ln ratio): grows with either kind of disagreement.

    Each as {mean, min, max} over channels, plus the largest |ln ratio|. Raises
    ValueError when the channel counts differ.
    """
    reference_mean = np.asarray(running_mean, dtype=np.float64).reshape(-1)
    reference_var = np.asarray(running_var, dtype=np.float64).reshape(-1) + eps
    observed_mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    observed_var = np.asarray(variance, dtype=np.float64).reshape(-1) + eps
    if observed_mean.shape != reference_mean.shape or observed_var.shape != reference_var.shape:
        raise ValueError(
            f"{observed_mean.size} channel statistics against {reference_mean.size} running ones"
        )
    shift = np.abs(observed_mean - reference_mean) / np.sqrt(reference_var)
    ratio = observed_var / reference_var
    log_ratio = np.log(ratio)
    kl = 0.5 * (ratio + shift**2 - 1.0 - log_ratio)
    return {
        "mean_shift": _spread(shift),
        "var_ratio": _spread(ratio),
        "max_abs_log_var_ratio": float(np.abs(log_ratio).max()),
        "kl_divergence": _spread(kl),
    }


def worst_first(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer drift entries sorted by their mean KL divergence, largest first."""
    return sorted(layers, key=lambda entry: entry["kl_divergence"]["mean"], reverse=True)
