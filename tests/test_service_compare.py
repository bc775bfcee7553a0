"""The compare statistics as pure functions, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.package_format import ManifestLayer
from bnfold.service.compare import (
    check_batch_has_statistics,
    compare_output,
    compare_report,
    layer_drift,
)
from bnfold.service.errors import Unprocessable

# float64 arithmetic on a handful of values: agreement to 1e-12 leaves room
# for summation order only.
EXACT = 1e-12


def _layer(
    running_mean: list[float], running_var: list[float], eps: float = 0.0, rank: int | None = 2
) -> ManifestLayer:
    return ManifestLayer(
        name="bn",
        channels=len(running_mean),
        eps=eps,
        input_rank=rank,
        running_mean=running_mean,
        running_var=running_var,
        batch_mean_output="bn.batch_mean",
        batch_var_output="bn.batch_var",
    )


def test_no_drift_when_the_batch_matches_the_running_statistics() -> None:
    drift = layer_drift(
        _layer([0.5, -1.0], [2.0, 0.25], eps=1e-5),
        np.array([0.5, -1.0], np.float32),
        np.array([2.0, 0.25], np.float32),
    )
    assert drift["mean_shift"]["max"] == 0.0
    assert drift["var_ratio"]["min"] == pytest.approx(1.0, abs=1e-7)  # float32 inputs
    assert drift["kl_divergence"]["max"] == pytest.approx(0.0, abs=1e-12)


def test_drift_values_by_hand() -> None:
    """Channel 0: mean off by 2 running stds, same variance; channel 1: variance x4."""
    drift = layer_drift(_layer([0.0, 0.0], [1.0, 1.0]), np.array([2.0, 0.0]), np.array([1.0, 4.0]))
    assert drift["mean_shift"] == {"mean": 1.0, "min": 0.0, "max": 2.0}
    assert drift["var_ratio"] == {"mean": 2.5, "min": 1.0, "max": 4.0}
    assert drift["max_abs_log_var_ratio"] == pytest.approx(math.log(4.0), abs=EXACT)
    # KL(N(2,1) || N(0,1)) = 2; KL(N(0,4) || N(0,1)) = 0.5 (4 - 1 - ln 4)
    kl_variance = 0.5 * (4.0 - 1.0 - math.log(4.0))
    assert drift["kl_divergence"]["max"] == pytest.approx(2.0, abs=EXACT)
    assert drift["kl_divergence"]["min"] == pytest.approx(kl_variance, abs=EXACT)


def test_eps_keeps_a_dead_channel_finite() -> None:
    drift = layer_drift(_layer([0.0], [1.0], eps=1e-5), np.array([0.0]), np.array([0.0]))
    assert math.isfinite(drift["kl_divergence"]["max"])
    assert drift["var_ratio"]["max"] == pytest.approx(1e-5 / (1.0 + 1e-5), rel=EXACT)


def test_output_comparison_by_hand() -> None:
    eval_output = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    train_output = np.array([[0.0, 1.0], [0.0, 4.0], [3.0, 4.0]])
    result = compare_output("y", eval_output, train_output)
    assert result["max_abs_diff"] == 2.0
    assert result["mean_abs_diff"] == pytest.approx(4.0 / 6.0, abs=EXACT)
    assert result["relative_l2_diff"] == pytest.approx(math.sqrt(6.0) / math.sqrt(30.0), abs=EXACT)
    # per-sample cosines: orthogonal (0), parallel (1), identical (1)
    assert result["cosine_similarity"] == pytest.approx(2.0 / 3.0, abs=EXACT)
    assert result["cosine_similarity_min"] == pytest.approx(0.0, abs=EXACT)
    assert result["argmax_agreement"] == pytest.approx(2.0 / 3.0, abs=EXACT)


def test_zero_outputs_have_defined_similarities() -> None:
    zeros = np.zeros((2, 3))
    result = compare_output("y", zeros, zeros)
    assert result["relative_l2_diff"] == 0.0 and result["cosine_similarity"] == 1.0
    assert compare_output("y", zeros, np.ones((2, 3)))["cosine_similarity"] == 0.0
    assert compare_output("y", np.zeros(4), np.zeros(4))["argmax_agreement"] is None


def test_batch_of_one_refused_for_flat_batchnorm_only() -> None:
    with pytest.raises(Unprocessable, match=r"batch of at least 2.*one value per channel"):
        check_batch_has_statistics([_layer([0.0], [1.0], rank=2)], 1)
    with pytest.raises(Unprocessable, match="batch of at least 2"):
        check_batch_has_statistics([_layer([0.0], [1.0], rank=None)], 1)
    with pytest.raises(Unprocessable, match="non-empty"):
        check_batch_has_statistics([_layer([0.0], [1.0], rank=4)], 0)
    check_batch_has_statistics([_layer([0.0], [1.0], rank=4)], 1)
    check_batch_has_statistics([_layer([0.0], [1.0], rank=2)], 2)


def test_report_sorts_worst_first_and_refuses_undefined_statistics() -> None:
    calm = _layer([0.0], [1.0]).model_copy(update={"name": "calm"})
    wild = _layer([0.0], [1.0]).model_copy(update={"name": "wild"})
    output = np.ones((2, 2))
    statistics = [np.array([0.1]), np.array([1.0]), np.array([3.0]), np.array([9.0])]
    _, drift = compare_report(["y"], [output], [output], [calm, wild], statistics, 2)
    assert [entry["name"] for entry in drift] == ["wild", "calm"]

    with pytest.raises(Unprocessable, match="NaN or infinity in 'y'"):
        compare_report(["y"], [output], [output * np.nan], [calm], statistics[:2], 2)
    with pytest.raises(Unprocessable, match="one value per channel"):
        compare_report(["y"], [output], [output], [calm], [np.array([0.0]), np.array([0.0])], 1)
