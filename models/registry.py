"""The built-in reference networks: the one place the converter and the CLI ask.

Names and specs import without torch, because the service (which has no
torch) reads `DEFAULT_REPOSITORY` and the names from here. Anything that needs
torch or scikit-learn is imported inside the function that needs it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from bnfold.models.recipes import BatchNormCalibration, DigitsTraining, Recipe

if TYPE_CHECKING:
    from torch import nn

DEFAULT_REPOSITORY: Final = Path(__file__).parent / "repository"
DEFAULT_CACHE_DIR: Final = Path(__file__).parent / ".cache"

_DIGITS_RANGE = "float32 pixels in [0, 1]: the digits' 0..16 divided by 16"
_IMAGENET_RANGE = "float32 RGB normalised per channel with ImageNet mean and std, about N(0, 1)"


class BuiltinModelError(Exception):
    """Base class for errors about built-in models; the message is for the user."""


class UnknownBuiltinModel(BuiltinModelError, KeyError):
    """No built-in model has this name. A KeyError too, as a failed lookup."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.message = f"unknown built-in model {name!r}; valid names: {', '.join(BUILTIN_NAMES)}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class NotADigitsModel(BuiltinModelError, ValueError):
    """The model was not trained on the digits, so digits inputs and accuracy make no sense."""

    def __init__(self, name: str) -> None:
        digits_names = [n for n, model in BUILTIN_MODELS.items() if model.trained_on_digits]
        super().__init__(
            f"built-in model {name!r} is not trained on the digits; "
            f"those that are: {', '.join(digits_names)}"
        )


@dataclass(frozen=True)
class BuiltinModel:
    """What a built-in network is and how it gets its weights.

    `architecture` is "module:callable" for a zero-argument constructor,
    resolved only when a network is built, so this spec stays torch-free.
    Bump `revision` whenever the architecture's code changes in a way that
    invalidates weights cached under the same recipe.
    """

    name: str
    architecture: str
    input_shape: tuple[int, ...]
    input_range: str
    description: str
    in_default_repository: bool
    recipe: Recipe
    revision: int = 1

    @property
    def trained_on_digits(self) -> bool:
        return isinstance(self.recipe, DigitsTraining)

    @property
    def fingerprint(self) -> str:
        """Short hash of everything that determines the weights: the weights-cache key."""
        identity = {
            "name": self.name,
            "architecture": self.architecture,
            "revision": self.revision,
            "recipe": type(self.recipe).__name__,
            **asdict(self.recipe),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def build_architecture(self) -> nn.Module:
        """A fresh network with untrained weights, drawn from torch's global RNG."""
        module_name, _, constructor = self.architecture.partition(":")
        return getattr(importlib.import_module(module_name), constructor)()

    def digits_inputs(self, pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Flat digits pixels (N, 64), as from `digits_dataset`, in this model's input shape."""
        if not self.trained_on_digits:
            raise NotADigitsModel(self.name)
        return pixels.reshape(len(pixels), *self.input_shape[1:])

    def load(self, *, cache_dir: Path | None = None, progress: bool = False) -> nn.Module:
        """The ready network in eval mode: from the weights cache, else trained or calibrated.

        A miss runs the recipe (seconds) and fills the cache, so the next load
        takes well under a second. `progress` shows a bar while the recipe runs.
        """
        from bnfold.models.weights import ready_network

        return ready_network(self, cache_dir or DEFAULT_CACHE_DIR, progress=progress)


def _digits_model(
    name: str, architecture: str, input_shape: tuple[int, ...], description: str, epochs: int
) -> BuiltinModel:
    """A digits model, trained with the hyperparameters they all share but the epochs."""
    return BuiltinModel(
        name=name,
        architecture=f"bnfold.models.digits:{architecture}",
        input_shape=input_shape,
        input_range=_DIGITS_RANGE,
        description=description,
        in_default_repository=True,
        recipe=DigitsTraining(epochs=epochs, batch_size=64, learning_rate=1e-2, weight_decay=1e-4),
    )


#: (name, architecture in bnfold.models.digits, input shape, description, training epochs)
_DIGITS_MODELS: Final = (
    (
        "digits_mlp",
        "DigitsMLP",
        (1, 64),
        "MLP on flattened 8x8 digits; BatchNorm1d after Linear and before Dropout+Linear",
        30,
    ),
    (
        "digits_resnet",
        "DigitsResNet",
        (1, 1, 8, 8),
        "small ResNet on 8x8 digits; identity and 1x1-conv-bn shortcuts",
        20,
    ),
    (
        "digits_mobilenet",
        "DigitsMobileNet",
        (1, 1, 8, 8),
        "depthwise-separable CNN on 8x8 digits; conv-bn-relu6 units",
        20,
    ),
    (
        "digits_conv1d",
        "DigitsConv1d",
        (1, 8, 8),
        "Conv1d over the 8 rows as steps of 8 features; BatchNorm before a replicate-padded Conv1d",
        20,
    ),
)


def _imagenet_model(name: str, architecture: str, description: str) -> BuiltinModel:
    return BuiltinModel(
        name=name,
        architecture=f"bnfold.models.imagenet:{architecture}",
        input_shape=(1, 3, 224, 224),
        input_range=_IMAGENET_RANGE,
        description=description,
        in_default_repository=False,
        recipe=BatchNormCalibration(passes=3, batch_size=8, seed=0),
    )


BUILTIN_MODELS: Final[Mapping[str, BuiltinModel]] = MappingProxyType(
    {
        model.name: model
        for model in (
            *(_digits_model(*row) for row in _DIGITS_MODELS),
            _imagenet_model(
                "resnet18", "ResNet18", "ResNet-18, random weights, calibrated BatchNorm"
            ),
            _imagenet_model(
                "mobilenet_v2", "MobileNetV2", "MobileNetV2, random weights, calibrated BatchNorm"
            ),
        )
    }
)
BUILTIN_NAMES: Final = tuple(BUILTIN_MODELS)


def builtin_model(name: str) -> BuiltinModel:
    """The spec called `name`; raises `UnknownBuiltinModel` listing the valid names."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise UnknownBuiltinModel(name) from None


def load_builtin(name: str, *, cache_dir: Path | None = None, progress: bool = False) -> nn.Module:
    """The ready (trained or calibrated, eval-mode) network called `name`; see `BuiltinModel.load`."""
    return builtin_model(name).load(cache_dir=cache_dir, progress=progress)


def evaluate_accuracy(name: str, *, cache_dir: Path | None = None) -> float:
    """Held-out accuracy of a digits model on the fixed test split."""
    from bnfold.models.data import digits_dataset
    from bnfold.models.training import accuracy

    model = builtin_model(name)
    split = digits_dataset()
    test_inputs = model.digits_inputs(split.test_inputs)
    return accuracy(model.load(cache_dir=cache_dir), test_inputs, split.test_labels)
