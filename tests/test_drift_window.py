"""The drift monitor's pure parts: the sliding window, the report, the reservoir.

Expected values come from numpy on the concatenated samples (the window must
pool to exactly what one pass over all of them gives) and from closed forms
(the KL of a pure mean shift is shift^2 / 2). Time is a test clock: no sleeps.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.bn_statistics import ChannelMoments, drift_measures
from bnfold.package_format import ManifestLayer
from bnfold.service.drift import (
    DRIFTED,
    INSUFFICIENT_DATA,
    OK,
    DriftWindow,
    channel_drift,
    drift_report,
)
from bnfold.service.drift_monitor import Reservoir


class Clock:
    """Seconds that only move when the test says so."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _moments(activations: np.ndarray) -> ChannelMoments:
    """What calibration.onnx reports for one run: mean and biased variance over every axis
    but the channel axis (1), and the values per channel."""
    axes = tuple(axis for axis in range(activations.ndim) if axis != 1)
    count = activations.size // activations.shape[1]
    return ChannelMoments.from_run(activations.mean(axis=axes), activations.var(axis=axes), count)


def _layer(name: str, running_mean: np.ndarray, running_var: np.ndarray) -> ManifestLayer:
    return ManifestLayer(
        name=name,
        channels=running_mean.size,
        eps=1e-5,
        running_mean=tuple(running_mean.tolist()),
        running_var=tuple(running_var.tolist()),
        batch_mean_output=f"{name}.batch_mean",
        batch_var_output=f"{name}.batch_var",
    )


# (N, C) like a BatchNorm1d after a Linear, (N, C, H, W) like a BatchNorm2d, (N, C, L)
SHAPES = {"dense": (5,), "image": (3, 4, 2), "sequence": (4, 6)}


def test_the_window_pools_to_numpy_over_every_sample_concatenated() -> None:
    rng = np.random.default_rng(0)
    clock = Clock(100.0)
    window = DriftWindow([5, 3, 4], window_seconds=60, clock=clock)
    batches: dict[str, list[np.ndarray]] = {name: [] for name in SHAPES}
    for step, rows in enumerate([1, 3, 7, 1, 1, 7, 3, 3, 1, 7]):
        clock.now += 4.0  # spread over several buckets, all within the window
        runs = []
        for (name, tail), scale in zip(SHAPES.items(), (1.0, 3.0, 0.1), strict=True):
            activations = rng.normal(step, scale, (rows, *tail))
            batches[name].append(activations)
            runs.append(_moments(activations))
        assert window.add(runs, rows=rows, requests=1)
    contents = window.read()
    assert (contents.rows, contents.requests) == (34, 10)
    for pooled, (name, tail) in zip(contents.moments, SHAPES.items(), strict=True):
        everything = np.concatenate(batches[name])
        axes = tuple(axis for axis in range(everything.ndim) if axis != 1)
        assert pooled.count == everything.size // tail[0]
        # float64 throughout: Chan's update agrees with the two-pass numpy to rounding
        np.testing.assert_allclose(pooled.mean, everything.mean(axis=axes), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pooled.variance(), everything.var(axis=axes), rtol=1e-12)


def test_batches_of_one_pool_into_a_variance() -> None:
    """A (1, C) run has one value per channel and no variance; ten of them have one."""
    rng = np.random.default_rng(1)
    window = DriftWindow([4], window_seconds=10, clock=Clock())
    rows = rng.normal(2.0, 3.0, (10, 4))
    for row in rows:
        window.add([_moments(row[None])], rows=1, requests=1)
    [pooled] = window.read().moments
    assert pooled.count == 10
    np.testing.assert_allclose(pooled.variance(), rows.var(axis=0), rtol=1e-12)


def test_buckets_expire_with_the_window() -> None:
    """10 s window in 10 buckets of 1 s: a sample leaves once its bucket is 10 buckets old."""
    clock = Clock(0.5)
    window = DriftWindow([1], window_seconds=10, clock=clock)
    early, late = np.array([[1.0], [3.0]]), np.array([[10.0], [14.0]])
    window.add([_moments(early)], rows=2, requests=1)
    clock.now = 5.5
    window.add([_moments(late)], rows=2, requests=1)

    clock.now = 9.99
    [both] = window.read().moments
    assert both.count == 4
    assert both.mean[0] == pytest.approx(7.0)

    clock.now = 10.0  # the bucket of t = 0.5 is [0, 1): out of the window from t = 10
    contents = window.read()
    assert (contents.rows, contents.requests, contents.moments[0].count) == (2, 1, 2)
    assert contents.moments[0].mean[0] == pytest.approx(12.0)

    clock.now = 15.0
    contents = window.read()
    assert (contents.rows, contents.moments[0].count) == (0, 0)


def test_a_sample_older_than_the_window_is_refused() -> None:
    clock = Clock(20.0)
    window = DriftWindow([1], window_seconds=10, clock=clock)
    assert not window.add([_moments(np.ones((2, 1)))], rows=2, requests=1, at=5.0)
    assert window.read().rows == 0


def test_memory_stays_bounded_whatever_the_traffic() -> None:
    clock = Clock()
    channels = [16, 8]
    window = DriftWindow(channels, window_seconds=10, buckets=10, clock=clock)
    run = [_moments(np.ones((2, count))) for count in channels]
    sizes, times = [], []
    for _ in range(3):
        for _ in range(2000):
            clock.now += 0.013  # every bucket of the ring used, many times over
            times.append(clock.now)
            window.add(run, rows=2, requests=1)
        sizes.append(window.nbytes)
    # ten buckets, each a mean and an M2 of float64 per channel
    assert sizes == [10 * 2 * 8 * sum(channels)] * 3
    # what the window holds: the current 1 s bucket and the nine before it
    held = [at for at in times if int(at) > int(clock.now) - 10]
    assert window.read().rows == 2 * len(held)


def test_channels_that_disagree_are_refused() -> None:
    window = DriftWindow([4], window_seconds=10, clock=Clock())
    with pytest.raises(ValueError, match="channels"):
        window.add([_moments(np.ones((2, 3)))], rows=2, requests=1)


def test_channel_drift_is_what_drift_measures_summarises() -> None:
    rng = np.random.default_rng(2)
    running_mean, running_var = rng.normal(size=6), rng.uniform(0.5, 2.0, 6)
    mean, var = rng.normal(size=6), rng.uniform(0.1, 3.0, 6)
    per_channel = channel_drift(running_mean, running_var, 1e-5, mean, var)
    summary = drift_measures(running_mean, running_var, 1e-5, mean, var)
    for key in ("mean_shift", "kl_divergence"):
        values = np.array(per_channel[key])
        assert summary[key] == pytest.approx(
            {"mean": values.mean(), "min": values.min(), "max": values.max()}, rel=1e-14
        )
    assert per_channel["mean"] == pytest.approx(mean.tolist())
    assert per_channel["var"] == pytest.approx(var.tolist())


def test_the_report_sorts_worst_first_and_gives_the_verdict() -> None:
    """Two layers fed their own running statistics exactly, one shifted by one running std:
    KL 0 and shift^2 / 2 = 0.5 nats."""
    channels = 3
    running_mean, running_var = np.zeros(channels), np.full(channels, 4.0)
    eps = 1e-5
    agreeing = ChannelMoments.from_run(running_mean, running_var, 50)
    shifted = ChannelMoments.from_run(running_mean + np.sqrt(4.0 + eps), running_var, 50)
    layers = [_layer(name, running_mean, running_var) for name in ("first", "second", "third")]

    entries, verdict = drift_report(layers, [agreeing, shifted, agreeing], kl_threshold=0.1)
    assert [entry["name"] for entry in entries] == ["second", "first", "third"]
    assert entries[0]["kl_divergence"]["mean"] == pytest.approx(0.5, rel=1e-9)
    assert entries[0]["mean_shift"]["max"] == pytest.approx(1.0, rel=1e-9)
    assert [entry["drifted"] for entry in entries] == [True, False, False]
    assert verdict == {"status": DRIFTED, "drifted_layers": 1, "layers": 3}

    _, calm = drift_report(layers, [agreeing, agreeing, agreeing], kl_threshold=0.1)
    assert calm == {"status": OK, "drifted_layers": 0, "layers": 3}

    # shift^2 / 2 = 0.5 is under a threshold of 0.6
    _, lenient = drift_report(layers, [agreeing, shifted, agreeing], kl_threshold=0.6)
    assert lenient["status"] == OK


def test_a_layer_without_a_variance_makes_the_data_insufficient() -> None:
    running_mean, running_var = np.zeros(2), np.ones(2)
    layers = [_layer("wide", running_mean, running_var), _layer("flat", running_mean, running_var)]
    one_value = ChannelMoments.from_run(np.ones(2), np.zeros(2), 1)
    many = ChannelMoments.from_run(np.ones(2), np.ones(2), 9)
    entries, verdict = drift_report(layers, [many, one_value], kl_threshold=0.1, channels=True)
    assert verdict["status"] == INSUFFICIENT_DATA
    waiting = entries[-1]
    assert waiting == {"name": "flat", "channels": 2, "values_per_channel": 1, "drifted": False}
    assert set(entries[0]["channel_statistics"]) == {"mean", "var", "mean_shift", "kl_divergence"}


def test_the_reservoir_keeps_the_newest_rows_within_its_caps() -> None:
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)  # 8 bytes a row
    by_rows = Reservoir(max_rows=7, max_bytes=1 << 20)
    by_bytes = Reservoir(max_rows=100, max_bytes=5 * 8)
    for start, stop in ((0, 3), (3, 4), (4, 11), (11, 20)):
        for reservoir in (by_rows, by_bytes):
            reservoir.add({"input": rows[start:stop].copy()}, stop - start)
    np.testing.assert_array_equal(by_rows.arrays()["input"], rows[-7:])
    np.testing.assert_array_equal(by_bytes.arrays()["input"], rows[-5:])
    assert (by_rows.rows, by_bytes.rows, by_bytes.nbytes) == (7, 5, 40)


def test_the_reservoir_returns_the_rows_shaped_like_the_newest() -> None:
    reservoir = Reservoir(max_rows=100, max_bytes=1 << 20)
    reservoir.add({"x": np.zeros((2, 3))}, 2)
    reservoir.add({"x": np.ones((1, 4))}, 1)
    reservoir.add({"x": np.full((3, 3), 2.0)}, 3)
    np.testing.assert_array_equal(
        reservoir.arrays()["x"], np.concatenate([np.zeros((2, 3)), np.full((3, 3), 2.0)])
    )
    assert Reservoir(max_rows=1, max_bytes=1).arrays() == {}
