#!/usr/bin/env python3
"""Print a pip requirements list derived from pyproject.toml, one requirement a line.

The Dockerfile's stages and tests/test_deploy_runtime.py both install through
this script, so the image and the test that stands in for it cannot drift
apart, and pyproject.toml stays the only place dependencies are declared.

    runtime-requirements.py                    the base dependencies: the serving stack
    runtime-requirements.py --device cuda      the same with onnxruntime-gpu for onnxruntime
    runtime-requirements.py --extra convert    the base dependencies plus an extra's

Only the stdlib is used (tomllib: Python 3.11+), because it runs before anything
is installed. Extras that name bnfold itself are not supported: the list must
be installable with `pip install -r` alone.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

DEFAULT_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The CPU and CUDA images differ in this one distribution; both install as the
# `onnxruntime` module, so bnfold imports the same name either way.
DEVICE_SWAPS = {"cpu": {}, "cuda": {"onnxruntime": "onnxruntime-gpu"}}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class RequirementsError(Exception):
    """pyproject.toml lacks what was asked for."""


def split_requirement(requirement: str) -> tuple[str, str]:
    """(normalised distribution name (PEP 503), the rest: extras, version, markers)."""
    found = _NAME.match(requirement)
    if found is None:
        raise RequirementsError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", found.group(1)).lower(), requirement[found.end() :]


def swap_distribution(requirement: str, swaps: dict[str, str]) -> str:
    """`requirement` with its distribution renamed per `swaps`, version and markers kept."""
    name, rest = split_requirement(requirement)
    return swaps[name] + rest if name in swaps else requirement


def requirements(pyproject: dict, *, device: str, extras: list[str]) -> list[str]:
    """The base dependencies (onnxruntime swapped for `device`), then each extra's."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise RequirementsError(
            f"unknown extra(s) {', '.join(unknown)}; pyproject.toml has {', '.join(optional)}"
        )
    lines = [swap_distribution(req, DEVICE_SWAPS[device]) for req in project["dependencies"]]
    for extra in extras:
        lines.extend(optional[extra])
    own_name, _ = split_requirement(project["name"])
    if any(split_requirement(line)[0] == own_name for line in lines):
        raise RequirementsError(f"an extra refers to {own_name} itself; list its requirements")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pyproject", nargs="?", type=Path, default=DEFAULT_PYPROJECT, help="pyproject.toml to read"
    )
    parser.add_argument("--device", choices=sorted(DEVICE_SWAPS), default="cpu")
    parser.add_argument("--extra", action="append", default=[], help="add an extra's list")
    args = parser.parse_args(argv)
    try:
        pyproject = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))
        lines = requirements(pyproject, device=args.device, extras=args.extra)
    except (OSError, tomllib.TOMLDecodeError, KeyError, RequirementsError) as exc:
        print(f"runtime-requirements: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
