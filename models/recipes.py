"""How each built-in network gets its weights: the numbers, not the loops.

Torch-free on purpose: the registry hashes these recipes into the weights-cache
key, and the registry must import without torch (the service imports it). The
loops that carry a recipe out live in `bnfold.models.training`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DigitsTraining:
    """Supervised training on the digits train split.

    AdamW with a one-cycle learning-rate schedule peaking at `learning_rate`,
    cross-entropy loss, the train split reshuffled every epoch from `seed`.
    The test split is never looked at: it stays held out for the accuracy check.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    seed: int = 0


@dataclass(frozen=True)
class BatchNormCalibration:
    """Random weights from `seed`, then BatchNorm running statistics from random input.

    Every parameter is drawn at random, the BatchNorm affine terms included
    (weight uniform in [0.5, 1.5], bias normal with std 0.1), so that a fold
    which drops or misplaces any term of the BatchNorm formula changes the
    outputs. The running statistics are the cumulative average over `passes`
    train-mode forward passes of `batch_size` standard-normal inputs, so they
    are what the network really sees rather than the 0/1 defaults.
    """

    passes: int = 3
    batch_size: int = 8
    seed: int = 0


Recipe = DigitsTraining | BatchNormCalibration
