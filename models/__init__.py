"""Built-in reference networks: four small digits models and two ImageNet-sized ones.

Importing this package does not import torch or scikit-learn (the serving
install has neither); they are imported when a network is built or the
digits are loaded.
"""

from bnfold.models.data import DigitsSplit, digits_dataset
from bnfold.models.registry import (
    BUILTIN_MODELS,
    BUILTIN_NAMES,
    DEFAULT_CACHE_DIR,
    DEFAULT_REPOSITORY,
    BuiltinModel,
    BuiltinModelError,
    NotADigitsModel,
    UnknownBuiltinModel,
    builtin_model,
    evaluate_accuracy,
    load_builtin,
)

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_NAMES",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_REPOSITORY",
    "BuiltinModel",
    "BuiltinModelError",
    "DigitsSplit",
    "NotADigitsModel",
    "UnknownBuiltinModel",
    "builtin_model",
    "digits_dataset",
    "evaluate_accuracy",
    "load_builtin",
]
