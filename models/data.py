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


#: Held-out images the web console ships as its demo batch (service/console/static/demo/).
DEMO_BATCH_SIZE: Final = 128


def demo_batch(count: int = DEMO_BATCH_SIZE) -> dict[str, object]:
    """The first `count` held-out images as the console's demo batch: raw pixels 0..16.

    The console (bnfold.service.console) is torch- and scikit-learn-free, so it
    ships these images as a JSON file instead of loading the digits; they are
    the held-out split, never trained on, so the accuracy the console shows is
    a test accuracy. Regenerate with
    `python -c "import json; from bnfold.models.data import demo_batch; print(json.dumps(demo_batch()))"`.
    """
    split = digits_dataset()
    pixels = np.rint(split.test_inputs[:count] * PIXEL_MAX).astype(int)
    return {
        "description": (
            f"The first {count} held-out images of the UCI optical digits (scikit-learn's "
            "load_digits, bnfold's fixed 80/20 split): 8x8 pixels, values 0..16, row-major."
        ),
        "licence": "UCI ML Repository, Optical Recognition of Handwritten Digits: CC BY 4.0",
        "pixel_max": int(PIXEL_MAX),
        "image_shape": [8, 8],
        "labels": split.test_labels[:count].tolist(),
        "pixels": pixels.tolist(),
    }
