"""Each fold pattern and each 'kept' reason, end to end through the real pipeline.

Every test converts a calibrated torch model into a temporary repository and
checks (1) the report, (2) how many BatchNormalization nodes remain in
model.onnx and (3) onnxruntime's output against torch eval on a fresh input
that the converter never saw.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional

from convert_helpers import (
    calibrated,
    convert_module,
    manifest,
    onnx_op_count,
    run_onnx,
    torch_eval,
    within_float32_tolerance,
)


def check_exact(module: nn.Module, result, shape: tuple[int, ...], batch: int = 5) -> None:
    x = np.random.default_rng(7).standard_normal((batch, *shape[1:])).astype(np.float32)
    (actual,) = run_onnx(Path(result.package_path) / "model.onnx", x)
    assert within_float32_tolerance(actual, torch_eval(module, x))


def folded_pairs(result) -> set[tuple[str, str, str]]:
    return {(item.name, item.into, item.direction) for item in result.batchnorm.folded}


def kept_reasons(result) -> dict[str, str]:
    return {item.name: item.reason for item in result.batchnorm.kept}


# ---- forward folds ---------------------------------------------------------------

CONV_CASES = [
    pytest.param(
        nn.Conv1d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm1d(6),
        (2, 4, 11),
        id="conv1d-stride-pad",
    ),
    pytest.param(
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False),
        nn.BatchNorm2d(6),
        (2, 4, 9, 9),
        id="conv2d-dilation-nobias",
    ),
    pytest.param(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.BatchNorm2d(4),
        (2, 4, 7, 7),
        id="conv2d-depthwise",
    ),
    pytest.param(
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2),
        nn.BatchNorm2d(6),
        (2, 4, 7, 7),
        id="conv2d-reflect-groups",
    ),
    pytest.param(
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
        nn.BatchNorm2d(6),
        (2, 4, 7, 7),
        id="conv2d-circular",
    ),
    pytest.param(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, padding_mode="replicate"),
        nn.BatchNorm3d(4),
        (2, 2, 5, 6, 6),
        id="conv3d-replicate",
    ),
    pytest.param(
        nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2),
        nn.BatchNorm1d(6),
        (2, 4, 5),
        id="convtranspose1d-groups",
    ),
    pytest.param(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False),
        nn.BatchNorm2d(6),
        (2, 4, 5, 5),
        id="convtranspose2d-groups-nobias",
    ),
    pytest.param(
        nn.ConvTranspose3d(2, 4, 2, stride=2),
        nn.BatchNorm3d(4),
        (2, 2, 3, 3, 3),
        id="convtranspose3d",
    ),
    pytest.param(nn.Linear(5, 7), nn.BatchNorm1d(7), (2, 5), id="linear-bn1d"),
    pytest.param(
        nn.Linear(5, 7, bias=False),
        nn.BatchNorm1d(7, affine=False),
        (2, 5),
        id="linear-nobias-affine-false",
    ),
]


def layer_bn_relu(layer: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A CONV_CASES model, on copies (the parametrised modules are shared by every suite)."""
    return calibrated(nn.Sequential(copy.deepcopy(layer), copy.deepcopy(bn), nn.ReLU()), shape)


@pytest.mark.parametrize(("layer", "bn", "shape"), CONV_CASES)
def test_forward_fold(layer: nn.Module, bn: nn.Module, shape, tmp_path: Path) -> None:
    model = layer_bn_relu(layer, bn, shape)
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("1", "0", "forward")}
    assert result.batchnorm.kept == []
    assert onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization") == 0
    check_exact(model, result, shape)


class LinearOnSequence(nn.Module):
    """(N, L, C_in) → Linear → (N, L, C) → transpose → BN1d over C → back."""

    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.permute = permute
        self.linear = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        y = y.permute(0, 2, 1) if self.permute else y.transpose(1, 2)
        return torch.relu(self.bn(y))


@pytest.mark.parametrize("permute", [False, True], ids=["transpose", "permute"])
def test_linear_on_sequence_folds_through_transpose(permute: bool, tmp_path: Path) -> None:
    shape = (2, 7, 5)
    model = calibrated(LinearOnSequence(permute), shape)
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("bn", "linear", "forward")}
    assert onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization") == 0
    check_exact(model, result, shape)


EVAL_NO_OPS_SHAPE = (2, 3, 6, 6)


def conv_eval_no_ops_bn() -> nn.Module:
    return calibrated(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout2d(0.5), nn.Identity(), nn.BatchNorm2d(4)),
        EVAL_NO_OPS_SHAPE,
    )


def test_forward_fold_looks_through_eval_no_ops(tmp_path: Path) -> None:
    shape = EVAL_NO_OPS_SHAPE
    model = conv_eval_no_ops_bn()
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("3", "0", "forward")}
    check_exact(model, result, shape)


# ---- backward folds --------------------------------------------------------------


HEAD_SHAPE = (2, 8)


def classifier_head() -> nn.Module:
    return calibrated(
        nn.Sequential(
            nn.Linear(8, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3)
        ),
        HEAD_SHAPE,
    )


def test_classifier_head_bn_dropout_linear_folds_backward(tmp_path: Path) -> None:
    shape = HEAD_SHAPE
    model = classifier_head()
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("2", "4", "backward")}
    assert onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization") == 0
    check_exact(model, result, shape)


FLATTEN_SHAPE = (2, 3, 5, 5)


def bn_flatten_linear() -> nn.Module:
    return calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)
        ),
        FLATTEN_SHAPE,
    )


def test_bn_flatten_linear_folds_backward_with_spatial_repeats(tmp_path: Path) -> None:
    shape = FLATTEN_SHAPE
    model = bn_flatten_linear()
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("2", "4", "backward")}
    check_exact(model, result, shape)


BACKWARD_CONV_CASES = [
    pytest.param(nn.Conv2d(4, 6, 3, groups=2), id="padding0-groups"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), id="reflect"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), id="replicate"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), id="circular"),
    pytest.param(nn.Conv1d(4, 6, 3, padding=2, padding_mode="circular"), id="circular-1d"),
    pytest.param(nn.Conv3d(4, 6, 3, padding=1, padding_mode="circular"), id="circular-3d"),
]


def relu_bn_conv(conv: nn.Module) -> nn.Module:
    """ReLU ─► BN ─► conv, with the BN's rank matching the conv's (the input has 4 channels)."""
    bn = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
    model = nn.Sequential(nn.ReLU(), bn[type(conv)](4), copy.deepcopy(conv))
    return calibrated(model, backward_conv_shape(conv))


def backward_conv_shape(conv: nn.Module) -> tuple[int, ...]:
    spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(conv)]
    return (2, 4, *[7] * spatial)


@pytest.mark.parametrize("conv", BACKWARD_CONV_CASES)
def test_bn_before_conv_folds_backward_where_exact(conv: nn.Module, tmp_path: Path) -> None:
    shape = backward_conv_shape(conv)
    model = relu_bn_conv(conv)
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("1", "2", "backward")}
    check_exact(model, result, shape)


# ---- kept, with the reason ----------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.bn(z) + z


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(self.bn(self.linear(x))))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.bn(self.first(x))))


KEPT_CASES = [
    pytest.param(lambda: Residual(), (2, 4, 5, 5), "bn", "residual", id="residual-branch"),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 3, 6, 6),
        "2",
        "non-linear",
        id="non-linear-between",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        (2, 3, 6, 6),
        "1",
        "track_running_stats=False",
        id="no-running-stats",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(3)),
        (2, 3, 5),
        "1",
        "channel axis does not line up",
        id="channel-axis",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)),
        (2, 4, 6, 6),
        "1",
        "zero-pads",
        id="zero-padding",
    ),
    pytest.param(
        lambda: SharedLayer(), (2, 4), "bn", "parameters are shared", id="layer-applied-twice"
    ),
    pytest.param(lambda: TiedWeights(), (2, 4), "bn", "parameters are shared", id="tied-weights"),
    pytest.param(
        lambda: nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()),
        (2, 4),
        "0",
        "graph input",
        id="first-layer",
    ),
]


@pytest.mark.parametrize(("factory", "shape", "bn_name", "reason"), KEPT_CASES)
def test_kept_with_reason_and_still_exact(
    factory, shape, bn_name: str, reason: str, tmp_path: Path
) -> None:
    model = calibrated(factory(), shape)
    result = convert_module(model, shape, tmp_path)
    reasons = kept_reasons(result)
    assert bn_name in reasons, result.batchnorm
    assert reason in reasons[bn_name]
    assert result.batchnorm.folded == []
    check_exact(model, result, shape)


# ---- hard numerical cases ----------------------------------------------------------


HARD_SHAPE = (2, 3, 6, 6)


def tiny_variance_large_gamma_large_eps() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, eps=1e-3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
        nn.BatchNorm1d(5),
    ).eval()
    with torch.no_grad():
        model[1].running_var.fill_(1e-8)  # scale ≈ γ/√(1e-5): ×316
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[4].weight.fill_(250.0)  # large γ
        model[4].running_var.uniform_(0.5, 2)
        model[8].running_var.uniform_(1e-8, 1e-7)
        model[8].weight.uniform_(50, 100)
    return model


def test_hard_cases_tiny_variance_large_gamma_large_eps(tmp_path: Path) -> None:
    shape = HARD_SHAPE
    model = tiny_variance_large_gamma_large_eps()
    result = convert_module(model, shape, tmp_path)
    assert len(result.batchnorm.folded) == 3
    check_exact(model, result, shape)


LARGE_SHAPE = (2, 16)


def large_activations() -> nn.Module:
    model = calibrated(
        nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)),
        LARGE_SHAPE,
    )
    with torch.no_grad():
        model[0].weight.mul_(1e3)
        model[0].bias.mul_(1e3)
        model[1].running_mean.mul_(1e3)
        model[1].running_var.mul_(1e6)
    return model


def test_large_activations(tmp_path: Path) -> None:
    shape = LARGE_SHAPE
    model = large_activations()
    sample = (np.random.default_rng(3).standard_normal((8, 16)) * 100).astype(np.float32)
    result = convert_module(model, shape, tmp_path, sample=sample)
    assert result.verification["passed"]
    (actual,) = run_onnx(Path(result.package_path) / "model.onnx", sample)
    assert within_float32_tolerance(actual, torch_eval(model, sample))


USERS_MODEL_SHAPE = (2, 3, 6, 6)


def conv_bn_flatten_linear() -> nn.Module:
    return calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
        ),
        USERS_MODEL_SHAPE,
    )


def test_the_users_model_is_never_modified(tmp_path: Path) -> None:
    shape = USERS_MODEL_SHAPE
    model = conv_bn_flatten_linear()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modules_before = [type(module) for module in model.modules()]
    result = convert_module(model, shape, tmp_path)
    assert len(result.batchnorm.folded) == 1
    assert [type(module) for module in model.modules()] == modules_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)  # running stats included
    assert not model.training


# ---- BNs without running statistics: kept, and no manifest layer -----------------------


NO_STATISTICS_SHAPE = (2, 3, 6, 6)


def no_running_statistics_beside_a_layer() -> nn.Module:
    return calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
        ),
        NO_STATISTICS_SHAPE,
    )


def test_bn_without_running_statistics_is_no_layer_and_has_no_train_outputs(
    tmp_path: Path,
) -> None:
    """The service needs numeric running statistics for every layer: none, no layer."""
    shape = NO_STATISTICS_SHAPE
    model = no_running_statistics_beside_a_layer()
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("3", "2", "forward")}
    reasons = kept_reasons(result)
    assert reasons["1"].startswith("track_running_stats=False")
    assert reasons["1"].endswith("so it is not in batchnorm.layers (compare skips it)")
    written = manifest(result)
    assert [layer["name"] for layer in written["batchnorm"]["layers"]] == ["3"]
    assert written["train_outputs"] == ["3.batch_mean", "3.batch_var"]
    train_outputs = [
        o.name for o in onnx.load(str(Path(result.package_path) / "train.onnx")).graph.output
    ]
    assert train_outputs == ["output", "3.batch_mean", "3.batch_var"]
    check_exact(model, result, shape)


NEGATIVE_VARIANCE_SHAPE = (2, 5)


def negative_running_variance() -> nn.Module:
    model = calibrated(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), NEGATIVE_VARIANCE_SHAPE)
    with torch.no_grad():
        model[1].running_var[1] = -0.5
    return model


def test_negative_running_variance_is_kept_and_no_layer(tmp_path: Path) -> None:
    """A layer with a negative running variance would be refused by the service."""
    shape = NEGATIVE_VARIANCE_SHAPE
    model = negative_running_variance()
    result = convert_module(model, shape, tmp_path)
    assert result.batchnorm.folded == []
    assert kept_reasons(result)["1"] == (
        "its running variance is negative, so it is not in batchnorm.layers (compare skips it)"
    )
    assert result.batchnorm.layers == []


# ---- functional batch_norm with constant statistics --------------------------------------


class RunningStatistics(nn.Module):
    """A BN's four tensors without the BN module, for `functional.batch_norm` calls.

    Drawn away from the defaults (like `calibrated` does for modules), so a
    wrong fold cannot look right.
    """

    def __init__(self, channels: int, *, affine: bool = True, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("running_mean", torch.rand(channels, generator=generator) * 2 - 1)
        self.register_buffer("running_var", torch.rand(channels, generator=generator) * 1.5 + 0.5)
        self.weight = (
            nn.Parameter(torch.rand(channels, generator=generator) + 0.5) if affine else None
        )
        self.bias = (
            nn.Parameter(torch.rand(channels, generator=generator) - 0.5) if affine else None
        )


class ConvFunctionalBatchNorm(nn.Module):
    """Conv ─► functional.batch_norm(tensors of a submodule) ─► ReLU."""

    def __init__(self, *, training: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.statistics = RunningStatistics(4)
        self.batch_statistics = training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.statistics
        y = functional.batch_norm(
            self.conv(x),
            tensors.running_mean,
            tensors.running_var,
            tensors.weight,
            tensors.bias,
            training=self.batch_statistics,
            eps=1e-3,
        )
        return torch.relu(y)


class FunctionalBatchNormLinear(nn.Module):
    """ReLU ─► functional.batch_norm(the root's buffers, no affine, by keyword) ─► Linear."""

    def __init__(self) -> None:
        super().__init__()
        statistics = RunningStatistics(6, affine=False, seed=1)
        self.register_buffer("running_mean", statistics.running_mean)
        self.register_buffer("running_var", statistics.running_var)
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = functional.batch_norm(
            input=torch.relu(x), running_mean=self.running_mean, running_var=self.running_var
        )
        return self.linear(normalised)


class ConvTransposeTorchBatchNorm(nn.Module):
    """ConvTranspose ─► torch.batch_norm (the aten-level call, positional arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(3, 4, 3, stride=2)
        self.statistics = RunningStatistics(4, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.statistics
        y = self.up(x)
        return torch.batch_norm(
            y,
            tensors.weight,
            tensors.bias,
            tensors.running_mean,
            tensors.running_var,
            False,
            0.1,
            1e-4,
            False,
        )


class FunctionalBatchStatistics(nn.Module):
    """Conv ─► functional.batch_norm with statistics computed from the batch itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        statistics = y.detach()  # batch_norm refuses running statistics that need a gradient
        return functional.batch_norm(
            y, statistics.mean((0, 2, 3)), statistics.var((0, 2, 3)), training=False
        )


class ModuleAndFunctionalBatchNorm(nn.Module):
    """Conv ─► BatchNorm2d ─► ReLU ─► Conv ─► functional.batch_norm, twice on one set of
    statistics (two calls: names suffixed with their node)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.second = nn.Conv2d(4, 4, 1)
        self.third = nn.Conv2d(4, 4, 1)
        self.statistics = RunningStatistics(4, seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.statistics
        y = torch.relu(self.bn(self.first(x)))
        y = functional.batch_norm(self.second(y), tensors.running_mean, tensors.running_var)
        return functional.batch_norm(self.third(y), tensors.running_mean, tensors.running_var)


FUNCTIONAL_FOLD_CASES = [
    pytest.param(
        ConvFunctionalBatchNorm,
        (2, 3, 6, 6),
        {("statistics.running_mean", "conv", "forward")},
        id="conv-functional",
    ),
    pytest.param(
        FunctionalBatchNormLinear,
        (2, 6),
        {("running_mean", "linear", "backward")},
        id="functional-linear",
    ),
    pytest.param(
        ConvTransposeTorchBatchNorm,
        (2, 3, 5),
        {("statistics.running_mean", "up", "forward")},
        id="convtranspose-torch-batch-norm",
    ),
]


@pytest.mark.parametrize(("factory", "shape", "folded"), FUNCTIONAL_FOLD_CASES)
def test_functional_batch_norm_with_module_statistics_folds(
    factory, shape, folded, tmp_path: Path
) -> None:
    """Named after its running mean; never a layer: train.onnx keeps the call as it is
    (verified against the model with its BN modules in train mode)."""
    model = calibrated(factory(), shape)
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == folded
    assert result.batchnorm.kept == [] and result.batchnorm.layers == []
    assert manifest(result)["train_outputs"] == []
    assert onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization") == 0
    check_exact(model, result, shape)


FUNCTIONAL_KEPT_CASES = [
    pytest.param(
        lambda: ConvFunctionalBatchNorm(training=True),
        (2, 3, 6, 6),
        "statistics.running_mean",
        "training=True: the functional batch_norm normalises with batch statistics",
        id="functional-training",
    ),
    pytest.param(
        FunctionalBatchStatistics,
        (2, 3, 6, 6),
        "batch_norm",
        "the functional batch_norm's running_mean is computed in the graph",
        id="functional-computed-statistics",
    ),
]


@pytest.mark.parametrize(("factory", "shape", "bn_name", "reason"), FUNCTIONAL_KEPT_CASES)
def test_functional_batch_norm_without_constant_statistics_is_kept(
    factory, shape, bn_name: str, reason: str, tmp_path: Path
) -> None:
    model = calibrated(factory(), shape)
    result = convert_module(model, shape, tmp_path)
    assert result.batchnorm.folded == []
    assert kept_reasons(result)[bn_name].startswith(reason)
    assert onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization") == 1
    check_exact(model, result, shape)


def test_functional_batch_norm_beside_a_module_is_no_layer(tmp_path: Path) -> None:
    """The module BN is the package's one layer; both functional calls fold, named apart."""
    shape = (2, 3, 6, 6)
    model = calibrated(ModuleAndFunctionalBatchNorm(), shape)
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {
        ("bn", "first", "forward"),
        ("statistics.running_mean@batch_norm", "second", "forward"),
        ("statistics.running_mean@batch_norm_1", "third", "forward"),
    }
    assert [layer.name for layer in result.batchnorm.layers] == ["bn"]
    assert manifest(result)["train_outputs"] == ["bn.batch_mean", "bn.batch_var"]
    assert result.verification["train"]["passed"]
    check_exact(model, result, shape)


# ---- the whole suite, for the tests that run these models another way -------------------

ModelFactory = Callable[[], nn.Module]


def torch_pattern_suite() -> list[object]:
    """Every model this file converts as (build, input shape); `build()` returns it ready to
    convert (statistics set, eval mode). tests/test_fold_parity.py runs each through the
    ONNX path too."""
    cases: list[object] = []

    def add(build: ModelFactory, shape: tuple[int, ...], case_id: str) -> None:
        cases.append(pytest.param(build, shape, id=case_id))

    for case in CONV_CASES:
        layer, bn, shape = case.values
        add(
            lambda layer=layer, bn=bn, shape=shape: layer_bn_relu(layer, bn, shape),
            shape,
            f"forward-{case.id}",
        )
    for permute in (False, True):
        add(
            lambda permute=permute: calibrated(LinearOnSequence(permute), (2, 7, 5)),
            (2, 7, 5),
            f"linear-on-sequence-{'permute' if permute else 'transpose'}",
        )
    add(conv_eval_no_ops_bn, EVAL_NO_OPS_SHAPE, "forward-through-eval-no-ops")
    add(classifier_head, HEAD_SHAPE, "backward-head")
    add(bn_flatten_linear, FLATTEN_SHAPE, "backward-through-flatten")
    for case in BACKWARD_CONV_CASES:
        (conv,) = case.values
        add(
            lambda conv=conv: relu_bn_conv(conv),
            backward_conv_shape(conv),
            f"backward-into-conv-{case.id}",
        )
    for case in KEPT_CASES:
        factory, shape, _bn_name, _reason = case.values
        add(
            lambda factory=factory, shape=shape: calibrated(factory(), shape),
            shape,
            f"kept-{case.id}",
        )
    add(tiny_variance_large_gamma_large_eps, HARD_SHAPE, "tiny-variance-large-gamma")
    add(large_activations, LARGE_SHAPE, "large-activations")
    add(conv_bn_flatten_linear, USERS_MODEL_SHAPE, "conv-bn-flatten-linear")
    add(
        no_running_statistics_beside_a_layer, NO_STATISTICS_SHAPE, "no-running-stats-beside-a-layer"
    )
    add(negative_running_variance, NEGATIVE_VARIANCE_SHAPE, "negative-running-variance")
    for case in [*FUNCTIONAL_FOLD_CASES, *FUNCTIONAL_KEPT_CASES]:
        factory, shape = case.values[:2]
        add(lambda factory=factory, shape=shape: calibrated(factory(), shape), shape, case.id)
    add(
        lambda: calibrated(ModuleAndFunctionalBatchNorm(), (2, 3, 6, 6)),
        (2, 3, 6, 6),
        "functional-beside-a-module",
    )
    return cases
