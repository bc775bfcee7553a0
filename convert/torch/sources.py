"""Turn what the user named on the command line into a torch module.

Source forms, tried in this order:
  * `*.onnx`                       → handled by the ONNX path, not here;
  * `path/to/file.py:factory`      → import the file, call factory();
  * `package.module:factory`       → import the module, call factory();
  * `*.pt` / `*.pth` / `*.pkl`      → a whole pickled model, only with trust_pickle
                                     (unpickling runs arbitrary code);
  * a built-in name from bnfold.models.
`--weights` is a state_dict read with `torch.load(weights_only=True)`, which
cannot run code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnfold.convert.errors import SourceError
from bnfold.package_format import sha256_file

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")


@dataclass
class LoadedSource:
    module: nn.Module
    kind: str  # builtin | factory | pickle
    ref: str
    default_name: str
    input_shape: tuple[int, ...] | None
    sha256: str
    weights_sha256: str | None = None


def load_source(source: str, *, weights: Path | None, trust_pickle: bool) -> LoadedSource:
    if ":" in source and not Path(source).exists():
        loaded = _load_factory(source)
    elif source.lower().endswith(PICKLE_SUFFIXES):
        loaded = _load_pickle(Path(source), trust_pickle)
    else:
        loaded = _load_builtin(source)
    if weights is not None:
        if loaded.kind != "factory":
            raise SourceError(
                "--weights applies to factory sources (file.py:factory or package.module:factory)"
            )
        _load_weights(loaded.module, weights)
        loaded.weights_sha256 = sha256_file(weights)
    if not isinstance(loaded.module, nn.Module):
        raise SourceError(
            f"{source} did not give a torch.nn.Module but {type(loaded.module).__name__}"
        )
    return loaded


def _load_builtin(name: str) -> LoadedSource:
    from bnfold.models.registry import BUILTIN_MODELS, load_builtin

    if name not in BUILTIN_MODELS:
        path = Path(name)
        if path.suffix or "/" in name:
            hint = "it is not a file" if not path.exists() else f"unknown file type {path.suffix!r}"
            raise SourceError(
                f"cannot read {name!r}: {hint}. Sources are a built-in name, file.py:factory, "
                "package.module:factory, a pickled model (.pt, with --trust-pickle) or a .onnx file"
            )
        raise SourceError(
            f"unknown built-in model {name!r}; built-ins are: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    spec = BUILTIN_MODELS[name]
    module = load_builtin(name, progress=sys.stderr.isatty())
    # A built-in has no source file: hash its trained parameters instead.
    state_digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        state_digest.update(key.encode())
        state_digest.update(tensor.detach().cpu().numpy().tobytes())
    digest = state_digest.hexdigest()
    return LoadedSource(module, "builtin", name, name, tuple(spec.input_shape), digest)


def _load_factory(source: str) -> LoadedSource:
    location, _, factory_name = source.rpartition(":")
    if not location or not factory_name.isidentifier():
        raise SourceError(
            f"invalid factory {source!r}: expected file.py:factory or package.module:factory"
        )
    if location.endswith(".py") or "/" in location:
        path = Path(location)
        if not path.is_file():
            raise SourceError(f"cannot read {location}: no such file")
        module_name = (
            f"_bnfold_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        )
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise SourceError(f"cannot import {location}")
        python_module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = python_module
        try:
            spec.loader.exec_module(python_module)
        except Exception as error:  # the user's code: any error is a bad source
            sys.modules.pop(module_name, None)
            raise SourceError(
                f"importing {location} failed: {type(error).__name__}: {error}"
            ) from error
        source_hash = sha256_file(path)
    else:
        try:
            python_module = importlib.import_module(location)
        except Exception as error:
            raise SourceError(
                f"cannot import module {location!r}: {type(error).__name__}: {error}"
            ) from error
        module_file = getattr(python_module, "__file__", None)
        source_hash = (
            sha256_file(Path(module_file))
            if module_file
            else hashlib.sha256(location.encode()).hexdigest()
        )
    factory = getattr(python_module, factory_name, None)
    if factory is None or not callable(factory):
        raise SourceError(f"{location} has no callable {factory_name!r}")
    try:
        module = factory()
    except Exception as error:
        raise SourceError(f"{source}() raised {type(error).__name__}: {error}") from error
    return LoadedSource(module, "factory", source, factory_name, None, source_hash)


def _load_pickle(path: Path, trust_pickle: bool) -> LoadedSource:
    if not path.is_file():
        raise SourceError(f"cannot read {path}: no such file")
    if not trust_pickle:
        raise SourceError(
            f"refusing to unpickle {path}: a pickle can run arbitrary code. Pass --trust-pickle if you "
            "trust its origin, or export a state_dict and use file.py:factory --weights"
        )
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise SourceError(f"cannot unpickle {path}: {type(error).__name__}: {error}") from error
    if isinstance(module, dict):
        raise SourceError(
            f"{path} holds a state_dict, not a model: use file.py:factory --weights {path}"
        )
    return LoadedSource(module, "pickle", str(path), path.stem, None, sha256_file(path))


def _load_weights(module: nn.Module, weights: Path) -> None:
    if not weights.is_file():
        raise SourceError(f"cannot read weights {weights}: no such file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SourceError(
            f"cannot load {weights} as a state_dict (weights_only=True refused it: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    if not isinstance(state, dict):
        raise SourceError(f"{weights} is not a state_dict (got {type(state).__name__})")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise SourceError(f"{weights} does not fit the model: {error}") from error
