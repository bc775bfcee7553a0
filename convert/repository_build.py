"""Build the embedded default repository: the built-in digits models, converted.

Idempotent: a model whose newest package is of the current schema is left
alone (unless `force`), so `make serve` converts on a fresh clone and starts
at once after. A model whose newest package predates the current schema (or
whose manifest cannot be read) is converted again into a new version, so an
old embedded repository gains what the service now uses (calibration.onnx:
drift monitoring, recalibration); the old versions stay as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bnfold.convert.package import existing_versions
from bnfold.convert.report import ConversionResult
from bnfold.convert.torch.pipeline import TorchConversionRequest, convert_torch
from bnfold.convert.torch.sources import load_source
from bnfold.package_format import MANIFEST, SCHEMA_VERSION, ManifestError, parse_manifest


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
    """Convert each named built-in that has no current package yet; return what was converted."""
    results = []
    for name in names or default_model_names():
        versions = existing_versions(repository, name)
        if versions and not force:
            outdated = outdated_reason(repository / name / str(versions[-1]))
            if outdated is None:
                if progress:
                    print(f"{name}: already in {repository}, skipped", file=sys.stderr)
                continue
            if progress:
                print(f"{name}: converting again as a new version: {outdated}", file=sys.stderr)
        loaded = load_source(name, weights=None, trust_pickle=False)
        results.append(convert_torch(TorchConversionRequest(loaded=loaded, repository=repository)))
    return results


def outdated_reason(package: Path) -> str | None:
    """Why the package at `package` is not what this converter writes, or None if it is."""
    try:
        manifest = parse_manifest((package / MANIFEST).read_bytes())
    except (OSError, ManifestError) as error:
        return f"version {package.name} cannot be read ({error})"
    if manifest.schema_version < SCHEMA_VERSION:
        return (
            f"version {package.name} is package schema {manifest.schema_version}, "
            f"this converter writes schema {SCHEMA_VERSION}"
        )
    return None
