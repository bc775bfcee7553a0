"""Where a built-in network's weights come from: the cache, or else its recipe.

The cache holds one `torch.save`d state_dict per model, named
`<name>-<fingerprint>.pt`; the fingerprint hashes the architecture and the
recipe, so changing either simply misses the cache instead of loading stale
weights. Files are written to a temporary name in the same directory and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bnfold.models.data import digits_dataset
from bnfold.models.recipes import DigitsTraining
from bnfold.models.training import calibrate_batchnorm, train_on_digits

if TYPE_CHECKING:
    from bnfold.models.registry import BuiltinModel


def cache_path(model: BuiltinModel, cache_dir: Path) -> Path:
    return cache_dir / f"{model.name}-{model.fingerprint}.pt"


def ready_network(model: BuiltinModel, cache_dir: Path, *, progress: bool) -> nn.Module:
    """The network with its trained or calibrated weights, in eval mode.

    On a cache hit the architecture is built on the meta device (no random
    init, no RNG use) and the cached tensors are assigned to it.
    """
    path = cache_path(model, cache_dir)
    if path.is_file():
        with torch.device("meta"):
            network = model.build_architecture()
        network.load_state_dict(
            torch.load(path, map_location="cpu", weights_only=True), assign=True
        )
        return network.eval()
    network = _produce(model, progress=progress)
    _save_atomically(network.state_dict(), path)
    return network


def _produce(model: BuiltinModel, *, progress: bool) -> nn.Module:
    if isinstance(model.recipe, DigitsTraining):
        split = digits_dataset()
        return train_on_digits(
            model.build_architecture,
            model.recipe,
            model.digits_inputs(split.train_inputs),
            split.train_labels,
            label=model.name,
            progress=progress,
        )
    return calibrate_batchnorm(
        model.build_architecture,
        model.recipe,
        model.input_shape[1:],
        label=model.name,
        progress=progress,
    )


def _save_atomically(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state_dict, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
