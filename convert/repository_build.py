"""Build the embedded default repository: the built-in digits models, converted.

Idempotent: a model that already has a package is left alone (unless
`force`), so `make serve` converts on a fresh clone and starts at once after.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bnfold.convert.package import existing_versions
from bnfold.convert.report import ConversionResult
from bnfold.convert.torch.pipeline import TorchConversionRequest, convert_torch
from bnfold.convert.torch.sources import load_source


def default_model_names() -> list[str]:
    from bnfold.models.registry import BUILTIN_MODELS

    return [name for name, spec in BUILTIN_MODELS.items() if spec.in_default_repository]


def build_default_repository(
    repository: Path,
    *,
    names: Sequence[str] | None = None,
    progress: bool = False,
    force: bool = False,
) -> list[ConversionResult]:
    """Convert each named built-in that has no package yet; return what was converted."""
    results = []
    for name in names or default_model_names():
        if existing_versions(repository, name) and not force:
            if progress:
                print(f"{name}: already in {repository}, skipped", file=sys.stderr)
            continue
        loaded = load_source(name, weights=None, trust_pickle=False)
        results.append(convert_torch(TorchConversionRequest(loaded=loaded, repository=repository)))
    return results
