"""The covariate shifts: what a camera or scanner change does to the digits.

Each shift maps pixels in [0, 1] to pixels in [0, 1] (a sensor cannot report
outside its range), is applied to the held-out images for accuracy and to the
training images, without their labels, for recalibration. Noise draws are
seeded and differ between the two, so no held-out noise is ever calibrated on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Pixels = npt.NDArray[np.float32]

#: Seeds of the noise drawn for the held-out and for the training images.
TEST_SEED = 1
TRAIN_SEED = 2
#: Seed of the permutation the nested calibration subsets (64, 256, ...) are drawn from.
SUBSET_SEED = 0


@dataclass(frozen=True)
class Shift:
    """A named, seeded map of pixels; `description` is what the report says it is."""

    name: str
    description: str
    apply: Callable[[Pixels, np.random.Generator], Pixels]

    def __call__(self, pixels: Pixels, seed: int) -> Pixels:
        shifted = self.apply(pixels, np.random.default_rng(seed))
        return np.clip(shifted, 0.0, 1.0).astype(np.float32)


SHIFTS: tuple[Shift, ...] = (
    Shift(
        "contrast",
        "contrast (sensor gain) ×0.3: pixels × 0.3",
        lambda pixels, _: pixels * 0.3,
    ),
    Shift(
        "brightness",
        "brightness +0.5, saturating: min(pixels + 0.5, 1)",
        lambda pixels, _: pixels + 0.5,
    ),
    Shift(
        "noise",
        "sensor noise: pixels + N(0, 0.3²) per pixel, clipped to [0, 1]",
        lambda pixels, rng: pixels + rng.normal(0.0, 0.3, pixels.shape),
    ),
)


def shift_named(name: str) -> Shift:
    return next(shift for shift in SHIFTS if shift.name == name)


def calibration_subset(pixels: Pixels, samples: int) -> Pixels:
    """The first `samples` of one fixed permutation: the subsets are nested, so 256
    samples include the 64, and every method and the anchor get the same rows in
    the same order."""
    order = np.random.default_rng(SUBSET_SEED).permutation(len(pixels))
    return pixels[order[:samples]]
