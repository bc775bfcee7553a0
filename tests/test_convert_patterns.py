"""Each fold pattern and each 'kept' reason, end to end through the real pipeline.

Every test converts a calibrated torch model into a temporary repository and
checks (1) the report, (2) how many BatchNormalization nodes remain in
model.onnx and (3) onnxruntime's output against torch eval on a fresh input
that the converter never saw.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional

from bnfold.convert.report import ConversionResult

from convert_helpers import (
    calibrated,
    convert_module,
    manifest,
    onnx_op_count,
    run_onnx,
    torch_eval,
    within_float32_tolerance,
)


def convert_exactly(model: nn.Module, shape: tuple[int, ...], repository: Path) -> ConversionResult:
    """Convert `model`, then check the package's model.onnx against torch eval on a fresh
    batch of 5 that the converter never saw."""
    result = convert_module(model, shape, repository)
    x = np.random.default_rng(7).standard_normal((5, *shape[1:])).astype(np.float32)
    (actual,) = run_onnx(Path(result.package_path) / "model.onnx", x)
    assert within_float32_tolerance(actual, torch_eval(model, x))
    return result


def folded_pairs(result) -> set[tuple[str, str, str]]:
    return {(item.name, item.into, item.direction) for item in result.batchnorm.folded}


def kept_reasons(result) -> dict[str, str]:
    return {item.name: item.reason for item in result.batchnorm.kept}


def batchnorm_nodes(result) -> int:
    """BatchNormalization nodes left in the package's model.onnx."""
    return onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization")


# ---- forward folds ---------------------------------------------------------------

BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def forward_case(case_id: str, layer: nn.Module, shape: tuple[int, ...], **bn_options) -> object:
    """A CONV_CASES row (layer, bn, input shape): the BN normalises the layer's output
    channels, a BatchNorm1d after a Linear."""
    if isinstance(layer, nn.Linear):
        bn = nn.BatchNorm1d(layer.out_features, **bn_options)
    else:
        bn = BATCHNORMS[len(layer.kernel_size)](layer.out_channels, **bn_options)
    return pytest.param(layer, bn, shape, id=case_id)


CONV_CASES = [
    forward_case("conv1d-stride-pad", nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    forward_case(
        "conv2d-dilation-nobias",
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False),
        (2, 4, 9, 9),
    ),
    forward_case("conv2d-depthwise", nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 7, 7)),
    forward_case(
        "conv2d-reflect-groups",
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2),
        (2, 4, 7, 7),
    ),
    forward_case(
        "conv2d-circular", nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 7, 7)
    ),
    forward_case(
        "conv3d-replicate",
        nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, padding_mode="replicate"),
        (2, 2, 5, 6, 6),
    ),
    forward_case(
        "convtranspose1d-groups", nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), (2, 4, 5)
    ),
    forward_case(
        "convtranspose2d-groups-nobias",
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False),
        (2, 4, 5, 5),
    ),
    forward_case("convtranspose3d", nn.ConvTranspose3d(2, 4, 2, stride=2), (2, 2, 3, 3, 3)),
    forward_case("linear-bn1d", nn.Linear(5, 7), (2, 5)),
    forward_case("linear-nobias-affine-false", nn.Linear(5, 7, bias=False), (2, 5), affine=False),
]


def layer_bn_relu(layer: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A CONV_CASES model, on copies (the parametrised modules are shared by every suite)."""
    return calibrated(nn.Sequential(copy.deepcopy(layer), copy.deepcopy(bn), nn.ReLU()), shape)


@pytest.mark.parametrize(("layer", "bn", "shape"), CONV_CASES)
def test_forward_fold(layer: nn.Module, bn: nn.Module, shape, tmp_path: Path) -> None:
    result = convert_exactly(layer_bn_relu(layer, bn, shape), shape, tmp_path)
    assert folded_pairs(result) == {("1", "0", "forward")}
    assert result.batchnorm.kept == []
    assert batchnorm_nodes(result) == 0


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
    result = convert_exactly(calibrated(LinearOnSequence(permute), shape), shape, tmp_path)
    assert folded_pairs(result) == {("bn", "linear", "forward")}
    assert batchnorm_nodes(result) == 0


EVAL_NO_OPS_SHAPE = (2, 3, 6, 6)


def conv_eval_no_ops_bn() -> nn.Module:
    return calibrated(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout2d(0.5), nn.Identity(), nn.BatchNorm2d(4)),
        EVAL_NO_OPS_SHAPE,
    )


def test_forward_fold_looks_through_eval_no_ops(tmp_path: Path) -> None:
    result = convert_exactly(conv_eval_no_ops_bn(), EVAL_NO_OPS_SHAPE, tmp_path)
    assert folded_pairs(result) == {("3", "0", "forward")}


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
    result = convert_exactly(classifier_head(), HEAD_SHAPE, tmp_path)
    assert folded_pairs(result) == {("2", "4", "backward")}
    assert batchnorm_nodes(result) == 0


FLATTEN_SHAPE = (2, 3, 5, 5)


def bn_flatten_linear() -> nn.Module:
    return calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)
        ),
        FLATTEN_SHAPE,
    )


def test_bn_flatten_linear_folds_backward_with_spatial_repeats(tmp_path: Path) -> None:
    result = convert_exactly(bn_flatten_linear(), FLATTEN_SHAPE, tmp_path)
    assert folded_pairs(result) == {("2", "4", "backward")}


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
    model = nn.Sequential(nn.ReLU(), BATCHNORMS[len(conv.kernel_size)](4), copy.deepcopy(conv))
    return calibrated(model, backward_conv_shape(conv))


def backward_conv_shape(conv: nn.Module) -> tuple[int, ...]:
    return (2, 4, *[7] * len(conv.kernel_size))


@pytest.mark.parametrize("conv", BACKWARD_CONV_CASES)
def test_bn_before_conv_folds_backward_where_exact(conv: nn.Module, tmp_path: Path) -> None:
    shape = backward_conv_shape(conv)
    result = convert_exactly(relu_bn_conv(conv), shape, tmp_path)
    assert folded_pairs(result) == {("1", "2", "backward")}


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


#: (build, input shape, kept BN, a pattern its reason must contain (`re.search`; `^` anchors it
#: at the start), BatchNormalization nodes left in model.onnx). A BN without running
#: statistics leaves none: the exporter writes its batch statistics out as plain ops.
#: `test_kept_with_reason_and_still_exact` (after FUNCTIONAL_KEPT_CASES) runs them all.
KEPT_CASES = [
    pytest.param(lambda: Residual(), (2, 4, 5, 5), "bn", "residual", 1, id="residual-branch"),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 3, 6, 6),
        "2",
        "non-linear",
        1,
        id="non-linear-between",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        (2, 3, 6, 6),
        "1",
        "track_running_stats=False",
        0,
        id="no-running-stats",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(3)),
        (2, 3, 5),
        "1",
        "channel axis does not line up",
        1,
        id="channel-axis",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)),
        (2, 4, 6, 6),
        "1",
        "zero-pads",
        1,
        id="zero-padding",
    ),
    pytest.param(
        lambda: SharedLayer(), (2, 4), "bn", "parameters are shared", 1, id="layer-applied-twice"
    ),
    pytest.param(
        lambda: TiedWeights(), (2, 4), "bn", "parameters are shared", 1, id="tied-weights"
    ),
    pytest.param(
        lambda: nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()),
        (2, 4),
        "0",
        "graph input",
        1,
        id="first-layer",
    ),
]


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
    result = convert_exactly(tiny_variance_large_gamma_large_eps(), HARD_SHAPE, tmp_path)
    assert len(result.batchnorm.folded) == 3


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
    result = convert_exactly(no_running_statistics_beside_a_layer(), NO_STATISTICS_SHAPE, tmp_path)
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
    result = convert_exactly(calibrated(factory(), shape), shape, tmp_path)
    assert folded_pairs(result) == folded
    assert result.batchnorm.kept == [] and result.batchnorm.layers == []
    assert manifest(result)["train_outputs"] == []
    assert batchnorm_nodes(result) == 0


#: As KEPT_CASES, for functional calls whose statistics are not constant.
FUNCTIONAL_KEPT_CASES = [
    pytest.param(
        lambda: ConvFunctionalBatchNorm(training=True),
        (2, 3, 6, 6),
        "statistics.running_mean",
        "^training=True: the functional batch_norm normalises with batch statistics",
        1,
        id="functional-training",
    ),
    pytest.param(
        FunctionalBatchStatistics,
        (2, 3, 6, 6),
        "batch_norm",
        "^the functional batch_norm's running_mean is computed in the graph",
        1,
        id="functional-computed-statistics",
    ),
]


@pytest.mark.parametrize(
    ("factory", "shape", "bn_name", "reason", "left_in_graph"),
    [*KEPT_CASES, *FUNCTIONAL_KEPT_CASES],
)
def test_kept_with_reason_and_still_exact(
    factory, shape, bn_name: str, reason: str, left_in_graph: int, tmp_path: Path
) -> None:
    result = convert_exactly(calibrated(factory(), shape), shape, tmp_path)
    reasons = kept_reasons(result)
    assert bn_name in reasons, result.batchnorm
    assert re.search(reason, reasons[bn_name]), reasons[bn_name]
    assert result.batchnorm.folded == []
    assert batchnorm_nodes(result) == left_in_graph


def test_functional_batch_norm_beside_a_module_is_no_layer(tmp_path: Path) -> None:
    """The module BN is the package's one layer; both functional calls fold, named apart."""
    shape = (2, 3, 6, 6)
    result = convert_exactly(calibrated(ModuleAndFunctionalBatchNorm(), shape), shape, tmp_path)
    assert folded_pairs(result) == {
        ("bn", "first", "forward"),
        ("statistics.running_mean@batch_norm", "second", "forward"),
        ("statistics.running_mean@batch_norm_1", "third", "forward"),
    }
    assert [layer.name for layer in result.batchnorm.layers] == ["bn"]
    assert manifest(result)["train_outputs"] == ["bn.batch_mean", "bn.batch_var"]
    assert result.verification["train"]["passed"]


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
        factory, shape = case.values[:2]
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
