"""Carrying out a recipe: the training loop, BatchNorm calibration, accuracy.

Everything runs inside `reproducible_torch`, so the same recipe gives the same
weights bit for bit on a given machine, and the caller's random state, thread
count and determinism flag are as they were afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import torch
from rich.console import Console
from rich.progress import track
from torch import nn

from bnfold.models.recipes import BatchNormCalibration, DigitsTraining

TRAINING_THREADS = 2
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def reproducible_torch(seed: int) -> Iterator[None]:
    """Seed torch, pin it to `TRAINING_THREADS` threads and deterministic kernels; undo on exit.

    The thread count is pinned because reductions split across a different
    number of threads may round differently. Two threads train the four
    digits models about a quarter faster than one on an idle 2-core machine,
    but on a machine busy with other work they can be several times slower
    (OpenMP workers spin waiting for a core). The global RNG is forked, not
    reseeded, so callers' random streams are left untouched.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(TRAINING_THREADS)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
            torch.set_num_threads(previous_threads)


def train_on_digits(
    build: Callable[[], nn.Module],
    recipe: DigitsTraining,
    inputs: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    *,
    label: str,
    progress: bool,
) -> nn.Module:
    """Build a network from the recipe's seed and train it; returns it in eval mode.

    `inputs` are already in the network's input shape. `label` names the
    progress bar (one step per epoch), shown only when `progress` is set.
    """
    with reproducible_torch(recipe.seed):
        network = build()
        features = torch.from_numpy(inputs)
        targets = torch.from_numpy(labels)
        optimizer = torch.optim.AdamW(
            network.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        steps_per_epoch = -(-len(targets) // recipe.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch
        )
        network.train()
        for _ in _steps(recipe.epochs, f"training {label}", progress):
            for batch in torch.randperm(len(targets)).split(recipe.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(network(features[batch]), targets[batch])
                loss.backward()
                optimizer.step()
                schedule.step()
    return network.eval()


def calibrate_batchnorm(
    build: Callable[[], nn.Module],
    recipe: BatchNormCalibration,
    sample_shape: tuple[int, ...],
    *,
    label: str,
    progress: bool,
) -> nn.Module:
    """Build a network with random weights and realistic BatchNorm statistics; eval mode.

    `sample_shape` is one input without the batch axis. See
    `BatchNormCalibration` for what is drawn and why.
    """
    with reproducible_torch(recipe.seed), torch.no_grad():
        network = build()
        batchnorms = [m for m in network.modules() if isinstance(m, _BATCHNORMS)]
        momenta = [batchnorm.momentum for batchnorm in batchnorms]
        for batchnorm in batchnorms:
            batchnorm.weight.uniform_(0.5, 1.5)
            batchnorm.bias.normal_(0.0, 0.1)
            batchnorm.reset_running_stats()
            batchnorm.momentum = None
        network.train()
        for _ in _steps(recipe.passes, f"calibrating {label}", progress):
            network(torch.randn(recipe.batch_size, *sample_shape))
        for batchnorm, momentum in zip(batchnorms, momenta, strict=True):
            batchnorm.momentum = momentum
    return network.eval()


def _steps(count: int, description: str, progress: bool) -> Iterable[int]:
    """range(count), with a bar on stderr when `progress`: stdout may carry JSON output."""
    return track(
        range(count), description=description, console=Console(stderr=True), disable=not progress
    )


def accuracy(
    network: nn.Module, inputs: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> float:
    """Fraction of `inputs` whose arg-max logit is the label; `network` must be in eval mode."""
    with torch.no_grad():
        predictions = network(torch.from_numpy(inputs)).argmax(dim=1).numpy()
    return float(np.mean(predictions == labels))
