"""The digits data set, split once and for all.

scikit-learn ships the UCI digits (1797 images of 8x8 pixels, values 0..16)
inside its wheel, so nothing is downloaded. The split is fixed (80/20,
stratified, seed 0) so that every training, every accuracy check and every
test draws from the same held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

PIXEL_MAX: Final = 16.0
TEST_FRACTION: Final = 0.2
SPLIT_SEED: Final = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Pixels as float32 in [0, 1], shape (N, 64) row-major; labels int64 in 0..9."""

    train_inputs: npt.NDArray[np.float32]
    train_labels: npt.NDArray[np.int64]
    test_inputs: npt.NDArray[np.float32]
    test_labels: npt.NDArray[np.int64]


def digits_dataset() -> DigitsSplit:
    """Load the digits and return the fixed train/test split, pixels divided by 16.

    Each model's spec turns the flat (N, 64) pixels into its own input shape
    (`BuiltinModel.digits_inputs`). scikit-learn is imported here, not at
    module level, because `bnfold.models` must import on the serving install,
    which has neither scikit-learn nor torch.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.data / PIXEL_MAX).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_inputs, test_inputs, train_labels, test_labels = train_test_split(
        pixels, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return DigitsSplit(train_inputs, train_labels, test_inputs, test_labels)
