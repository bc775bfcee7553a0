"""The built-in networks: accuracy, determinism, the weights cache, the torch-free import.

Real training on real data, no mocks. Every network is trained once per
session into a temporary cache, so the suite measures from-scratch training
and never depends on (or disturbs) the developer's `models/.cache`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnfold.models import (
    BUILTIN_MODELS,
    BUILTIN_NAMES,
    DEFAULT_CACHE_DIR,
    DEFAULT_REPOSITORY,
    NotADigitsModel,
    UnknownBuiltinModel,
    builtin_model,
    digits_dataset,
    evaluate_accuracy,
    load_builtin,
)
from bnfold.models.digits import DigitsConv1d, DigitsMLP
from bnfold.models.weights import cache_path

DIGITS_NAMES = [name for name, model in BUILTIN_MODELS.items() if model.trained_on_digits]
IMAGENET_NAMES = [name for name, model in BUILTIN_MODELS.items() if not model.trained_on_digits]
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding all four digits models, trained from scratch; prints the times."""
    cache_dir = tmp_path_factory.mktemp("weights")
    seconds: dict[str, float] = {}
    for name in DIGITS_NAMES:
        start = time.perf_counter()
        load_builtin(name, cache_dir=cache_dir)
        seconds[name] = time.perf_counter() - start
    per_model = ", ".join(f"{name} {elapsed:.1f} s" for name, elapsed in seconds.items())
    print(f"digits training: {per_model}; total {sum(seconds.values()):.1f} s")
    return cache_dir


@pytest.fixture(scope="module")
def imagenet_networks(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, nn.Module]:
    cache_dir = tmp_path_factory.mktemp("imagenet-weights")
    return {name: load_builtin(name, cache_dir=cache_dir) for name in IMAGENET_NAMES}


def _assert_same_state(left: nn.Module, right: nn.Module) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state.keys() == right_state.keys()
    for key, tensor in left_state.items():
        assert torch.equal(tensor, right_state[key]), key


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_digits_model_reaches_held_out_accuracy(trained_cache: Path, name: str) -> None:
    assert evaluate_accuracy(name, cache_dir=trained_cache) >= 0.95


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_digits_model_is_eval_mode_and_returns_logits(trained_cache: Path, name: str) -> None:
    model = builtin_model(name)
    network = load_builtin(name, cache_dir=trained_cache)
    inputs = model.digits_inputs(digits_dataset().test_inputs[:5])
    assert inputs.shape == (5, *model.input_shape[1:])
    with torch.no_grad():
        logits = network(torch.from_numpy(inputs))
    assert not any(module.training for module in network.modules())
    assert logits.shape == (5, 10)
    assert any(isinstance(module, BATCHNORMS) for module in network.modules())


@pytest.mark.parametrize("name", DIGITS_NAMES)
def test_second_load_reads_the_cache(trained_cache: Path, name: str) -> None:
    """A doctored cache file comes back as is: proof the load read it instead of retraining."""
    path = cache_path(builtin_model(name), trained_cache)
    original = torch.load(path, weights_only=True)
    doctored = {
        key: tensor + 1 if tensor.is_floating_point() else tensor
        for key, tensor in original.items()
    }
    torch.save(doctored, path)
    try:
        loaded = load_builtin(name, cache_dir=trained_cache).state_dict()
    finally:
        torch.save(original, path)
    assert loaded.keys() == doctored.keys()
    for key, tensor in doctored.items():
        assert torch.equal(loaded[key], tensor), key
    assert list(trained_cache.glob(".*")) == [], "a temporary file was left behind"


def test_training_is_deterministic_and_leaves_torch_as_it_was(
    trained_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            rng_before = torch.get_rng_state()
            retrained = load_builtin("digits_mlp", cache_dir=tmp_path)
            assert torch.equal(torch.get_rng_state(), rng_before)
        assert torch.get_num_threads() == 1
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads_before)
    _assert_same_state(retrained, load_builtin("digits_mlp", cache_dir=trained_cache))
    captured = capsys.readouterr()
    assert captured.out == captured.err == "", "progress=False must be quiet"


def test_progress_shows_the_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_builtin("digits_mlp", cache_dir=tmp_path, progress=True)
    captured = capsys.readouterr()
    assert "training digits_mlp" in captured.err
    assert captured.out == "", "stdout is left to the caller's output"


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_model_returns_1000_logits(
    imagenet_networks: Mapping[str, nn.Module], name: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = imagenet_networks[name](torch.randn(2, 3, 224, 224, generator=generator))
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_batchnorm_is_calibrated(
    imagenet_networks: Mapping[str, nn.Module], name: str
) -> None:
    network = imagenet_networks[name]
    batchnorms = [module for module in network.modules() if isinstance(module, BATCHNORMS)]
    assert len(batchnorms) == {"resnet18": 20, "mobilenet_v2": 52}[name]
    for batchnorm in batchnorms:
        assert not batchnorm.training
        assert batchnorm.momentum == 0.1
        assert int(batchnorm.num_batches_tracked) == 3
        assert not torch.equal(batchnorm.running_mean, torch.zeros_like(batchnorm.running_mean))
        assert not torch.equal(batchnorm.running_var, torch.ones_like(batchnorm.running_var))
        assert not torch.equal(batchnorm.weight, torch.ones_like(batchnorm.weight))


def test_imagenet_parameter_counts_are_the_standard_ones(
    imagenet_networks: Mapping[str, nn.Module],
) -> None:
    """The published sizes (torchvision's 11,689,512 and 3,504,872) pin the architectures."""
    counts = {
        name: sum(parameter.numel() for parameter in network.parameters())
        for name, network in imagenet_networks.items()
    }
    assert counts == {"resnet18": 11_689_512, "mobilenet_v2": 3_504_872}


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownBuiltinModel) as raised:
        load_builtin("resnet50")
    assert isinstance(raised.value, KeyError)
    message = str(raised.value)
    assert "'resnet50'" in message
    for name in BUILTIN_NAMES:
        assert name in message


def test_accuracy_of_an_imagenet_model_is_refused() -> None:
    with pytest.raises(NotADigitsModel, match="digits_mlp, digits_resnet"):
        evaluate_accuracy("resnet18")


def test_digits_dataset_is_a_fixed_normalised_stratified_split() -> None:
    split = digits_dataset()
    assert split.train_inputs.shape == (1437, 64)
    assert split.test_inputs.shape == (360, 64)
    assert split.train_inputs.dtype == split.test_inputs.dtype == np.float32
    assert split.train_inputs.min() == 0.0 and split.train_inputs.max() == 1.0
    assert set(np.bincount(split.test_labels)) <= {35, 36, 37}
    np.testing.assert_array_equal(digits_dataset().test_inputs, split.test_inputs)


def test_specs() -> None:
    assert BUILTIN_NAMES == (
        "digits_mlp",
        "digits_resnet",
        "digits_mobilenet",
        "digits_conv1d",
        "resnet18",
        "mobilenet_v2",
    )
    assert [name for name in BUILTIN_NAMES if BUILTIN_MODELS[name].in_default_repository] == (
        DIGITS_NAMES
    )
    shapes = {name: model.input_shape for name, model in BUILTIN_MODELS.items()}
    assert shapes == {
        "digits_mlp": (1, 64),
        "digits_resnet": (1, 1, 8, 8),
        "digits_mobilenet": (1, 1, 8, 8),
        "digits_conv1d": (1, 8, 8),
        "resnet18": (1, 3, 224, 224),
        "mobilenet_v2": (1, 3, 224, 224),
    }
    assert (
        DEFAULT_REPOSITORY.parent
        == DEFAULT_CACHE_DIR.parent
        == Path(__file__).parents[1] / "models"
    )
    with pytest.raises(TypeError):
        BUILTIN_MODELS["digits_mlp"] = BUILTIN_MODELS["resnet18"]  # type: ignore[index]


def test_fingerprint_follows_the_recipe() -> None:
    model = builtin_model("digits_mlp")
    longer = dataclasses.replace(model.recipe, epochs=model.recipe.epochs + 1)
    assert dataclasses.replace(model, recipe=longer).fingerprint != model.fingerprint
    assert dataclasses.replace(model, revision=2).fingerprint != model.fingerprint
    assert dataclasses.replace(model).fingerprint == model.fingerprint


def test_mlp_head_has_batchnorm_before_dropout_and_linear() -> None:
    head = list(DigitsMLP().head)
    assert [type(module) for module in head] == [nn.BatchNorm1d, nn.Dropout, nn.Linear]


def test_conv1d_has_batchnorm_right_before_a_replicate_padded_conv() -> None:
    assert any(
        isinstance(first, nn.BatchNorm1d)
        and isinstance(second, nn.Conv1d)
        and second.padding_mode == "replicate"
        for first, second in pairwise(DigitsConv1d().features)
    )


def test_import_does_not_pull_in_torch_or_sklearn() -> None:
    code = (
        "import sys, bnfold.models\n"
        "assert bnfold.models.BUILTIN_NAMES\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'sklearn' not in sys.modules, 'sklearn imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
