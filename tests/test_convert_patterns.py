"""Each fold pattern and each 'kept' reason, end to end through the real pipeline.

Every test converts a calibrated torch model into a temporary repository and
checks (1) the report, (2) how many BatchNormalization nodes remain in
model.onnx and (3) onnxruntime's output against torch eval on a fresh input
that the converter never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

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


@pytest.mark.parametrize(("layer", "bn", "shape"), CONV_CASES)
def test_forward_fold(layer: nn.Module, bn: nn.Module, shape, tmp_path: Path) -> None:
    model = calibrated(nn.Sequential(layer, bn, nn.ReLU()), shape)
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


def test_forward_fold_looks_through_eval_no_ops(tmp_path: Path) -> None:
    shape = (2, 3, 6, 6)
    model = calibrated(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout2d(0.5), nn.Identity(), nn.BatchNorm2d(4)),
        shape,
    )
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("3", "0", "forward")}
    check_exact(model, result, shape)


# ---- backward folds --------------------------------------------------------------


def test_classifier_head_bn_dropout_linear_folds_backward(tmp_path: Path) -> None:
    shape = (2, 8)
    model = calibrated(
        nn.Sequential(
            nn.Linear(8, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3)
        ),
        shape,
    )
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("2", "4", "backward")}
    assert onnx_op_count(Path(result.package_path) / "model.onnx", "BatchNormalization") == 0
    check_exact(model, result, shape)


def test_bn_flatten_linear_folds_backward_with_spatial_repeats(tmp_path: Path) -> None:
    shape = (2, 3, 5, 5)
    model = calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)
        ),
        shape,
    )
    result = convert_module(model, shape, tmp_path)
    assert folded_pairs(result) == {("2", "4", "backward")}
    check_exact(model, result, shape)


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(nn.Conv2d(4, 6, 3, groups=2), id="padding0-groups"),
        pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), id="reflect"),
        pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), id="replicate"),
        pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), id="circular"),
    ],
)
def test_bn_before_conv_folds_backward_where_exact(conv: nn.Module, tmp_path: Path) -> None:
    shape = (2, 4, 7, 7)
    model = calibrated(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), conv), shape)
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


def test_hard_cases_tiny_variance_large_gamma_large_eps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shape = (2, 3, 6, 6)
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
    result = convert_module(model, shape, tmp_path)
    assert len(result.batchnorm.folded) == 3
    check_exact(model, result, shape)


def test_large_activations(tmp_path: Path) -> None:
    shape = (2, 16)
    model = calibrated(
        nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)), shape
    )
    with torch.no_grad():
        model[0].weight.mul_(1e3)
        model[0].bias.mul_(1e3)
        model[1].running_mean.mul_(1e3)
        model[1].running_var.mul_(1e6)
    sample = (np.random.default_rng(3).standard_normal((8, 16)) * 100).astype(np.float32)
    result = convert_module(model, shape, tmp_path, sample=sample)
    assert result.verification["passed"]
    (actual,) = run_onnx(Path(result.package_path) / "model.onnx", sample)
    assert within_float32_tolerance(actual, torch_eval(model, sample))


def test_the_users_model_is_never_modified(tmp_path: Path) -> None:
    shape = (2, 3, 6, 6)
    model = calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
        ),
        shape,
    )
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


def test_bn_without_running_statistics_is_no_layer_and_has_no_train_outputs(
    tmp_path: Path,
) -> None:
    """The service needs numeric running statistics for every layer: none, no layer."""
    shape = (2, 3, 6, 6)
    model = calibrated(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
        ),
        shape,
    )
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


def test_negative_running_variance_is_kept_and_no_layer(tmp_path: Path) -> None:
    """A layer with a negative running variance would be refused by the service."""
    shape = (2, 5)
    model = calibrated(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), shape)
    with torch.no_grad():
        model[1].running_var[1] = -0.5
    result = convert_module(model, shape, tmp_path)
    assert result.batchnorm.folded == []
    assert kept_reasons(result)["1"] == (
        "its running variance is negative, so it is not in batchnorm.layers (compare skips it)"
    )
    assert result.batchnorm.layers == []
