"""The console's demo batch is what it says: held-out digits, never trained on.

The console ships the images as JSON (it is torch- and scikit-learn-free); this
test rebuilds them from scikit-learn's digits with the split stated in
models/data.py and checks the shipped file against them, so a change of split
or a hand-edited file cannot pass.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def _shipped() -> dict[str, object]:
    path = resources.files("bnfold.service.console") / "static" / "demo" / "digits.json"
    return json.loads(path.read_text(encoding="utf-8"))


def test_demo_batch_is_the_held_out_digits() -> None:
    shipped = _shipped()
    digits = load_digits()
    _, test_pixels, _, test_labels = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    pixels = np.asarray(shipped["pixels"])
    count = len(pixels)
    assert count == 128
    assert shipped["pixel_max"] == 16
    np.testing.assert_array_equal(pixels, test_pixels[:count].astype(int))
    np.testing.assert_array_equal(shipped["labels"], test_labels[:count])
