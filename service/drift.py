"""Drift of live traffic from a package's running statistics: the sliding window and the report.

Pure numpy (and a lock): no sessions, no threads of its own, no HTTP. The drift
monitor (`drift_monitor`) feeds a `DriftWindow` with each sampled request's
per-BatchNorm input moments and reads it back pooled; `drift_report` turns the
pooled moments into the per-layer measures and the verdict.

The window is a ring of `buckets` time buckets of `window_seconds / buckets`
each: a sample lands in the bucket of the time it was sampled, a bucket is
reused (reset) when its slot comes round again, and a read pools the buckets
younger than the window. So the state is `buckets` x (layers x channels) numbers
whatever the traffic, and a read covers the last `window_seconds` to within one
bucket. Pooling is Chan's exact combination (`bnfold.bn_statistics`): the
pooled mean and biased variance are those of every sampled value concatenated,
whatever the batch sizes (a batch of one included).

The measures are compare's (`bnfold.bn_statistics.drift_measures`), between the
pooled mean and biased variance of a layer's input and the manifest's running
statistics, so a layer "drifted" here by the number compare shows for a batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from bnfold.bn_statistics import ChannelMoments, drift_measures, pool, worst_first
from bnfold.package_format import ManifestLayer

#: Time buckets per window: reads are exact to within a tenth of the window.
WINDOW_BUCKETS: Final = 10
#: A layer needs this many values per channel in the window for a variance.
MIN_VALUES_PER_CHANNEL: Final = 2

OK: Final = "ok"
DRIFTED: Final = "drifted"
INSUFFICIENT_DATA: Final = "insufficient_data"


@dataclass
class _Bucket:
    """The samples of one time slice: per-layer moments, rows and requests."""

    number: int  # floor(sampled at / bucket seconds)
    moments: list[ChannelMoments]
    rows: int = 0
    requests: int = 0


@dataclass(frozen=True)
class WindowContents:
    """A window read: per-layer pooled moments (manifest order), rows and requests in it."""

    moments: tuple[ChannelMoments, ...]
    rows: int
    requests: int


class DriftWindow:
    """Per-layer input moments of the samples of the last `window_seconds`, in bounded memory.

    Thread-safe: the monitor's worker adds, the event loop reads. `clock` gives
    the time in seconds (monotonic; tests pass their own).
    """

    def __init__(
        self,
        channels: Sequence[int],
        window_seconds: float,
        buckets: int = WINDOW_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0 or buckets < 1:
            raise ValueError("a window needs a positive length and at least one bucket")
        self.channels = tuple(channels)
        self.window_seconds = window_seconds
        self.bucket_seconds = window_seconds / buckets
        self.clock = clock
        self._ring: list[_Bucket | None] = [None] * buckets
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of statistics held: at most `buckets` x 2 x (sum of channels) float64s."""
        with self._lock:
            return sum(
                run.mean.nbytes + run.m2.nbytes
                for bucket in self._ring
                if bucket is not None
                for run in bucket.moments
            )

    def bucket_number(self, at: float) -> int:
        return math.floor(at / self.bucket_seconds)

    def _live(self, number: int, now: float) -> bool:
        current = self.bucket_number(now)
        return current - len(self._ring) < number <= current

    def add(
        self,
        moments: Sequence[ChannelMoments],
        rows: int,
        requests: int,
        at: float | None = None,
    ) -> bool:
        """Pool one run's per-layer moments into the bucket of `at` (default: now).

        Returns False, adding nothing, for a sample already older than the window
        (its slot holds a later bucket). Raises ValueError when the channels differ.
        """
        if [run.channels for run in moments] != list(self.channels):
            raise ValueError(
                f"moments for channels {[run.channels for run in moments]}, "
                f"the window holds {list(self.channels)}"
            )
        at = self.clock() if at is None else at
        number = self.bucket_number(at)
        slot = number % len(self._ring)
        with self._lock:
            if not self._live(number, self.clock()):
                return False
            bucket = self._ring[slot]
            if bucket is None or bucket.number < number:
                bucket = _Bucket(number, [ChannelMoments.empty(count) for count in self.channels])
                self._ring[slot] = bucket
            elif bucket.number > number:
                return False
            bucket.moments = [
                pooled.combine(run) for pooled, run in zip(bucket.moments, moments, strict=True)
            ]
            bucket.rows += rows
            bucket.requests += requests
        return True

    def read(self) -> WindowContents:
        """Every bucket younger than the window, pooled."""
        now = self.clock()
        with self._lock:
            live = [
                bucket
                for bucket in self._ring
                if bucket is not None and self._live(bucket.number, now)
            ]
            per_layer = [
                pool([ChannelMoments.empty(count), *(bucket.moments[index] for bucket in live)])
                for index, count in enumerate(self.channels)
            ]
        return WindowContents(
            tuple(per_layer),
            sum(bucket.rows for bucket in live),
            sum(bucket.requests for bucket in live),
        )


def channel_drift(
    running_mean: Sequence[float] | np.ndarray,
    running_var: Sequence[float] | np.ndarray,
    eps: float,
    mean: np.ndarray,
    variance: np.ndarray,
) -> dict[str, list[float]]:
    """Per channel: the observed mean and biased variance, the mean shift and the KL.

    `drift_measures` summarises these over channels (same formulas; a test checks
    that its spreads equal theirs); this is the drill-down behind them.
    """
    reference_var = np.asarray(running_var, np.float64) + eps
    observed_mean = np.asarray(mean, np.float64)
    observed_var = np.asarray(variance, np.float64)
    shift = np.abs(observed_mean - np.asarray(running_mean, np.float64)) / np.sqrt(reference_var)
    ratio = (observed_var + eps) / reference_var
    kl = 0.5 * (ratio + shift**2 - 1.0 - np.log(ratio))
    return {
        "mean": observed_mean.tolist(),
        "var": observed_var.tolist(),
        "mean_shift": shift.tolist(),
        "kl_divergence": kl.tolist(),
    }


def layer_report(
    layer: ManifestLayer, pooled: ChannelMoments, kl_threshold: float, channels: bool
) -> dict[str, Any]:
    """One layer's entry: its measures once it has a variance, and whether it drifted."""
    entry: dict[str, Any] = {
        "name": layer.name,
        "channels": layer.channels,
        "values_per_channel": pooled.count,
    }
    if pooled.count < MIN_VALUES_PER_CHANNEL:
        return {**entry, "drifted": False}
    variance = pooled.variance()
    measures = drift_measures(
        layer.running_mean, layer.running_var, layer.eps, pooled.mean, variance
    )
    entry |= measures
    entry["drifted"] = measures["kl_divergence"]["mean"] > kl_threshold
    if channels:
        entry["channel_statistics"] = channel_drift(
            layer.running_mean, layer.running_var, layer.eps, pooled.mean, variance
        )
    return entry


def drift_report(
    layers: Sequence[ManifestLayer],
    pooled: Sequence[ChannelMoments],
    kl_threshold: float,
    channels: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-layer entries worst first, the verdict).

    Worst first by mean KL; layers without a variance yet follow, in manifest
    order. The verdict's status: `insufficient_data` while any layer has fewer
    than two values per channel in the window, else `drifted` when any layer's
    mean KL exceeds `kl_threshold`, else `ok`.
    """
    entries = [
        layer_report(layer, moments, kl_threshold, channels)
        for layer, moments in zip(layers, pooled, strict=True)
    ]
    measured = [entry for entry in entries if "kl_divergence" in entry]
    waiting = [entry for entry in entries if "kl_divergence" not in entry]
    drifted = sum(entry["drifted"] for entry in measured)
    status = INSUFFICIENT_DATA if waiting else DRIFTED if drifted else OK
    verdict = {"status": status, "drifted_layers": drifted, "layers": len(entries)}
    return [*worst_first(measured), *waiting], verdict
