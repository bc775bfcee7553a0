"""Property tests of the fold arithmetic against torch's own modules.

Everything runs in float64 so the comparison checks the algebra, not float32
rounding: folded and unfolded must agree to ~1e-9 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnfold.convert.fold import (
    BatchNormParams,
    batchnorm_affine,
    fold_after_layer,
    fold_before_layer,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def random_bn(channels: int, spatial_dims: int, eps: float, affine: bool, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    bn = BN[spatial_dims](channels, eps=eps, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        bn.running_var.copy_(
            torch.rand(channels, generator=generator, dtype=torch.float64) * 3 + 1e-3
        )
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
            bn.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return bn.eval()


def params_of(bn: nn.Module) -> BatchNormParams:
    return BatchNormParams(
        bn.running_mean.numpy(),
        bn.running_var.numpy(),
        bn.eps,
        bn.weight.detach().numpy() if bn.affine else None,
        bn.bias.detach().numpy() if bn.affine else None,
    )


def rewritten(layer: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.from_numpy(weight))
        layer.bias = nn.Parameter(torch.from_numpy(bias))
    return layer


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float64 end to end: only the order of summation differs.
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


shapes = st.fixed_dictionaries(
    {
        "dims": st.integers(1, 3),
        "groups": st.sampled_from([1, 2, 3]),
        "per_group_in": st.integers(1, 3),
        "per_group_out": st.integers(1, 3),
        "kernel": st.integers(1, 3),
        "bias": st.booleans(),
        "affine": st.booleans(),
        "eps": st.sampled_from([1e-5, 1e-3, 0.1]),
        "seed": st.integers(0, 10_000),
    }
)


def weight_and_bias(layer: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    return (
        layer.weight.detach().numpy(),
        None if layer.bias is None else layer.bias.detach().numpy(),
    )


def assert_conv_fold_matches(
    case: dict, *, transposed: bool = False, bn_first: bool = False
) -> None:
    """Fold a random BatchNorm into the float64 conv ``case`` describes (a stride-2 transposed
    conv when ``transposed``) — on its input side when ``bn_first``, else on its output side —
    and check the rewritten layer against the unfolded pair."""
    in_channels = case["groups"] * case["per_group_in"]
    out_channels = case["groups"] * case["per_group_out"]
    torch.manual_seed(case["seed"])
    common = {"groups": case["groups"], "bias": case["bias"]}
    if transposed:
        layer = CONV_TRANSPOSE[case["dims"]](
            in_channels, out_channels, case["kernel"], stride=2, **common
        ).double()
    else:
        layer = CONV[case["dims"]](in_channels, out_channels, case["kernel"], **common).double()
    bn_channels = in_channels if bn_first else out_channels
    bn = random_bn(bn_channels, case["dims"], case["eps"], case["affine"], case["seed"])
    x = torch.randn(2, in_channels, *([4 if transposed else 5] * case["dims"]), dtype=torch.float64)
    if bn_first:
        expected = layer(bn(x))
        folded = fold_before_layer(*weight_and_bias(layer), params_of(bn), groups=case["groups"])
    else:
        expected = bn(layer(x))
        folded = fold_after_layer(
            *weight_and_bias(layer), params_of(bn), transposed=transposed, groups=case["groups"]
        )
    assert_close(rewritten(layer, folded.weight, folded.bias)(x), expected)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_forward_fold_into_conv_matches_conv_then_bn(case: dict) -> None:
    assert_conv_fold_matches(case)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_forward_fold_into_conv_transpose_matches(case: dict) -> None:
    assert_conv_fold_matches(case, transposed=True)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_backward_fold_into_conv_matches_bn_then_conv(case: dict) -> None:
    assert_conv_fold_matches(case, bn_first=True)


@settings(max_examples=40, deadline=None)
@given(
    channels=st.integers(1, 6),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    out_features=st.integers(1, 5),
    bias=st.booleans(),
    affine=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3]),
    seed=st.integers(0, 10_000),
)
def test_linear_folds_both_ways(channels, spatial, out_features, bias, affine, eps, seed) -> None:
    torch.manual_seed(seed)
    repeats = int(np.prod(spatial)) if spatial else 1
    linear = nn.Linear(channels * repeats, out_features, bias=bias).double()
    bn_before = random_bn(channels, len(spatial), eps, affine, seed)
    x = torch.randn(3, channels, *spatial, dtype=torch.float64)
    expected = linear(bn_before(x).flatten(1))
    folded = fold_before_layer(*weight_and_bias(linear), params_of(bn_before), repeats=repeats)
    after_backward = rewritten(linear, folded.weight, folded.bias)
    assert_close(after_backward(x.flatten(1)), expected)

    bn_after = random_bn(out_features, 0, eps, affine, seed + 1)
    expected_forward = bn_after(after_backward(x.flatten(1)))
    folded_forward = fold_after_layer(*weight_and_bias(after_backward), params_of(bn_after))
    assert_close(
        rewritten(after_backward, folded_forward.weight, folded_forward.bias)(x.flatten(1)),
        expected_forward,
    )


def test_affine_false_means_unit_gamma_zero_beta() -> None:
    params = BatchNormParams(np.array([1.0, -2.0]), np.array([4.0, 0.25]), 0.0)
    scale, shift = batchnorm_affine(params)
    np.testing.assert_allclose(scale, [0.5, 2.0])
    np.testing.assert_allclose(shift, [-0.5, 4.0])


def test_fold_is_computed_in_float64_and_cast_back() -> None:
    weight = np.ones((2, 3), dtype=np.float32)
    params = BatchNormParams(np.zeros(2), np.full(2, 1e-8), 1e-5, np.full(2, 1e3), np.zeros(2))
    folded = fold_after_layer(weight, None, params)
    assert folded.weight.dtype == np.float32 and folded.bias.dtype == np.float32
    expected = np.float32(1e3 / np.sqrt(1e-8 + 1e-5))
    assert folded.weight[0, 0] == expected


def test_channel_mismatch_is_refused() -> None:
    params = BatchNormParams(np.zeros(3), np.ones(3), 1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        fold_after_layer(np.ones((2, 4)), None, params)
    with pytest.raises(ValueError, match="covers 3 inputs"):
        fold_before_layer(np.ones((2, 4)), None, params)
