"""The BatchNorm fold arithmetic: the one implementation in bnfold.

In inference mode a BatchNorm is the per-channel affine map

    y = γ·(x − μ)/√(σ² + ε) + β  =  scale·x + shift,
    scale = γ/√(σ² + ε),  shift = β − μ·scale.

Folding composes that map with a neighbouring linear layer. Both the torch
and the ONNX paths call these functions with numpy arrays; nothing else in the
project knows the formula. Everything is computed in float64 and cast back to
the weight's dtype at the end, so the fold adds one rounding per parameter and
no more.

Weight layouts follow torch (and ONNX, which uses the same ones):
  * "out-first": Linear (out, in), Conv (out, in/groups, *kernel);
  * ConvTranspose: (in, out/groups, *kernel).
Callers holding other layouts (a MatMul's (in, out) weight) transpose first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchNormParams:
    """A BatchNorm's inference-mode parameters, as numpy arrays.

    `gamma`/`beta` are None for affine=False (γ=1, β=0).
    """

    running_mean: np.ndarray
    running_var: np.ndarray
    eps: float
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(np.asarray(self.running_mean).shape[0])


@dataclass(frozen=True)
class FoldedWeights:
    """The rewritten layer parameters; `bias` is always present after a fold."""

    weight: np.ndarray
    bias: np.ndarray


def batchnorm_affine(bn: BatchNormParams) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale, shift) in float64 so that BN(x) = scale·x + shift per channel."""
    running_mean = np.asarray(bn.running_mean, dtype=np.float64)
    running_var = np.asarray(bn.running_var, dtype=np.float64)
    gamma = np.ones_like(running_mean) if bn.gamma is None else np.asarray(bn.gamma, np.float64)
    beta = np.zeros_like(running_mean) if bn.beta is None else np.asarray(bn.beta, np.float64)
    scale = gamma / np.sqrt(running_var + float(bn.eps))
    shift = beta - running_mean * scale
    return scale, shift


def _bias_or_zeros(bias: np.ndarray | None, size: int) -> np.ndarray:
    if bias is None:
        return np.zeros(size, dtype=np.float64)
    return np.asarray(bias, dtype=np.float64)


def _check_channels(expected: int, bn: BatchNormParams, what: str) -> None:
    if bn.channels != expected:
        raise ValueError(
            f"BatchNorm has {bn.channels} channels but the layer's {what} has {expected}"
        )


def fold_after_layer(
    weight: np.ndarray,
    bias: np.ndarray | None,
    bn: BatchNormParams,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> FoldedWeights:
    """Fold a BN that consumes the layer's output (the forward fold).

    W'[o] = W[o]·scale[o],  b' = b·scale + shift  (= (b − μ)·γ/√(σ²+ε) + β).
    For a ConvTranspose (`transposed`), output channel o of group g is column
    o − g·(out/groups) of the rows belonging to group g.
    """
    weight64 = np.asarray(weight, dtype=np.float64)
    scale, shift = batchnorm_affine(bn)
    if transposed:
        in_channels, out_per_group = weight64.shape[0], weight64.shape[1]
        if in_channels % groups:
            raise ValueError(f"{in_channels} input channels do not split into {groups} groups")
        out_channels = out_per_group * groups
        _check_channels(out_channels, bn, "output channels")
        kernel = weight64.shape[2:]
        grouped = weight64.reshape(groups, in_channels // groups, out_per_group, *kernel)
        scale_view = scale.reshape(groups, 1, out_per_group, *([1] * len(kernel)))
        new_weight = (grouped * scale_view).reshape(weight64.shape)
    else:
        out_channels = weight64.shape[0]
        _check_channels(out_channels, bn, "output channels")
        new_weight = weight64 * scale.reshape(-1, *([1] * (weight64.ndim - 1)))
    new_bias = _bias_or_zeros(bias, out_channels) * scale + shift
    return FoldedWeights(_cast_like(new_weight, weight), _cast_like(new_bias, weight))


def fold_before_layer(
    weight: np.ndarray,
    bias: np.ndarray | None,
    bn: BatchNormParams,
    *,
    groups: int = 1,
    repeats: int = 1,
) -> FoldedWeights:
    """Fold a BN whose output the layer consumes (the backward fold).

    Layer(scale·x + shift) = (W·diag(scale))·x + (b + W·shift): input channel i
    of the weight is multiplied by scale[i] and the bias absorbs W·shift. Only
    exact when every input the layer reads went through the BN; zero padding
    breaks that (a padded 0 is not scale·0 + shift), so callers must refuse it.

    `weight` is out-first: Linear (out, in) or Conv (out, in/groups, *kernel).
    `repeats` maps BN channel c to `repeats` consecutive inputs, as a Flatten of
    (N, C, *spatial) does with repeats = prod(spatial).
    """
    weight64 = np.asarray(weight, dtype=np.float64)
    scale, shift = batchnorm_affine(bn)
    if repeats != 1:
        scale, shift = np.repeat(scale, repeats), np.repeat(shift, repeats)
    out_channels, in_per_group = weight64.shape[0], weight64.shape[1]
    if out_channels % groups:
        raise ValueError(f"{out_channels} output channels do not split into {groups} groups")
    in_channels = in_per_group * groups
    if scale.shape[0] != in_channels:
        raise ValueError(
            f"BatchNorm covers {scale.shape[0]} inputs but the layer reads {in_channels}"
        )
    kernel = weight64.shape[2:]
    kernel_ones = [1] * len(kernel)
    grouped = weight64.reshape(groups, out_channels // groups, in_per_group, *kernel)
    new_weight = grouped * scale.reshape(groups, 1, in_per_group, *kernel_ones)
    # Each output channel adds Σ_{i in its group, k} W[o, i, k]·shift[i].
    summed_kernel = grouped.reshape(groups, out_channels // groups, in_per_group, -1).sum(axis=3)
    bias_shift = np.einsum(
        "goi,gi->go", summed_kernel, shift.reshape(groups, in_per_group)
    ).reshape(out_channels)
    new_bias = _bias_or_zeros(bias, out_channels) + bias_shift
    return FoldedWeights(
        _cast_like(new_weight.reshape(weight64.shape), weight), _cast_like(new_bias, weight)
    )


def _cast_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    dtype = np.asarray(like).dtype
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float32)
    return np.ascontiguousarray(values.astype(dtype))
