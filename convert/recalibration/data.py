"""Calibration data: read from files or taken in memory, checked against the package's inputs.

Three file forms, all read with `allow_pickle=False`:

* `X.npy`: one array, for a model with one input;
* `X.npz`: one array per model input, named as the input (a model with one input
  also takes an .npz holding a single array of any name);
* a directory: its `*.npy` and `*.npz` files, sorted by file name, each read as
  above, concatenated along axis 0 (the batch axis).

In memory (the service: a decoded request, or its reservoir of live inputs) the
same checks run on a mapping from input name to array, or one array.

The checks are the model's own contract, so a recalibration never runs on data
the served model would refuse: exactly the manifest's datatype (no silent
casts: a float64 array gets a hint to `.astype`), the rank and every fixed
axis, only finite values, at least one sample. `--max-samples N` keeps the
first N samples. The sha256 recorded in the manifest is over the raw bytes of
each input's array (C order, the model's datatype, after `--max-samples`),
input after input in the manifest's order: for a one-input model,
`hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.convert.errors import CalibrationDataError, first_line
from bnfold.package_format import DATATYPES, ManifestTensor

#: What the API takes as data: a path, one array (one-input models) or arrays by input name.
CalibrationSource = Path | np.ndarray | Mapping[str, np.ndarray]

_DATA_SUFFIXES = (".npy", ".npz")


@dataclass(frozen=True)
class CalibrationData:
    """Checked calibration data: one C-contiguous array per model input (manifest order),
    all with the same number of samples along axis 0."""

    arrays: dict[str, np.ndarray]
    sha256: str
    description: str

    @property
    def samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])


def calibration_data(
    source: CalibrationSource,
    inputs: Sequence[ManifestTensor],
    *,
    max_samples: int | None = None,
    description: str | None = None,
) -> CalibrationData:
    """Read (a path) or take (arrays) the data, keep the first `max_samples`, check it.

    Raises CalibrationDataError naming the problem; nothing is modified in place.
    """
    if max_samples is not None and max_samples < 1:
        raise CalibrationDataError(f"--max-samples must be at least 1, got {max_samples}")
    if isinstance(source, Path):
        arrays = read_data_path(source, inputs, max_samples)
        label = description or str(source)
    else:
        arrays = _by_input(source, inputs, "the calibration data")
        label = description or "in-memory arrays"
    if max_samples is not None:
        arrays = {name: array[:max_samples] for name, array in arrays.items()}
    checked = check_arrays(arrays, inputs)
    return CalibrationData(checked, data_sha256(checked, inputs), label)


def read_data_path(
    path: Path, inputs: Sequence[ManifestTensor], max_samples: int | None = None
) -> dict[str, np.ndarray]:
    """The arrays of an .npy, an .npz or a directory of them, by input name (unchecked).

    A directory stops being read once `max_samples` samples are in.
    """
    if path.is_dir():
        files = sorted(
            entry for entry in path.iterdir() if entry.suffix in _DATA_SUFFIXES and entry.is_file()
        )
        if not files:
            raise CalibrationDataError(f"data directory {path} holds no .npy or .npz files")
        parts: list[dict[str, np.ndarray]] = []
        rows = 0
        for file in files:
            parts.append(_read_file(file, inputs))
            rows += _rows(parts[-1])
            if max_samples is not None and rows >= max_samples:
                break
        return _concatenated(parts, files, inputs)
    if not path.exists():
        raise CalibrationDataError(f"cannot read data {path}: no such file or directory")
    if path.suffix not in _DATA_SUFFIXES:
        raise CalibrationDataError(
            f"cannot read data {path}: give an .npy file, an .npz file or a directory of them"
        )
    return _read_file(path, inputs)


def _read_file(path: Path, inputs: Sequence[ManifestTensor]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                loaded: np.ndarray | dict[str, np.ndarray] = {
                    key: archive[key] for key in archive.files
                }
        else:
            loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as error:
        raise CalibrationDataError(
            f"cannot read data {path} as {path.suffix}: {first_line(error)}"
        ) from error
    return _by_input(loaded, inputs, str(path))


def _by_input(
    loaded: np.ndarray | Mapping[str, np.ndarray], inputs: Sequence[ManifestTensor], where: str
) -> dict[str, np.ndarray]:
    """`loaded` as {input name: array}: one array for a one-input model, else every input's."""
    names = [spec.name for spec in inputs]
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise CalibrationDataError(
                f"{where} holds one array but the model has {len(names)} inputs "
                f"({', '.join(names)}): give an .npz with one array per input name"
            )
        return {names[0]: loaded}
    arrays = dict(loaded)
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [name for name in names if name not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown {', '.join(extra)}"
        raise CalibrationDataError(
            f"{where} {problem}: it needs exactly one array per model input "
            f"({', '.join(names)}), it has {', '.join(sorted(arrays)) or 'none'}"
        )
    return {name: arrays[name] for name in names}


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    first = next(iter(arrays.values()))
    return int(first.shape[0]) if first.ndim else 0


def _concatenated(
    parts: Sequence[dict[str, np.ndarray]], files: Sequence[Path], inputs: Sequence[ManifestTensor]
) -> dict[str, np.ndarray]:
    """One array per input from the files' arrays, refusing ones that cannot be stacked."""
    joined: dict[str, np.ndarray] = {}
    for spec in inputs:
        pieces = [part[spec.name] for part in parts]
        first = pieces[0]
        for file, piece in zip(files, pieces, strict=False):
            if piece.ndim == 0 or piece.shape[1:] != first.shape[1:] or piece.dtype != first.dtype:
                raise CalibrationDataError(
                    f"{file} holds {spec.name} of shape {piece.shape} and dtype {piece.dtype}, "
                    f"{files[0].name} of shape {first.shape} and dtype {first.dtype}: the files "
                    "of a data directory are concatenated along axis 0"
                )
        joined[spec.name] = np.concatenate(pieces, axis=0)
    return joined


def check_arrays(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[ManifestTensor]
) -> dict[str, np.ndarray]:
    """Every input's array, C-contiguous, if it is what the model takes; else CalibrationDataError."""
    checked: dict[str, np.ndarray] = {}
    samples: int | None = None
    for spec in inputs:
        given = arrays[spec.name]
        # A memory-mapped file is read into memory (the bytes hashed are the bytes that run);
        # anything else is copied only when it is not C-contiguous.
        array = np.array(given, order="C", copy=True if isinstance(given, np.memmap) else None)
        needed = DATATYPES[spec.datatype]
        if array.dtype != needed:
            raise CalibrationDataError(
                f"input {spec.name} is {array.dtype}, the model takes {needed} ({spec.datatype}): "
                f"convert it first, e.g. x.astype(np.{needed.name})"
            )
        _check_shape(spec, array.shape)
        if not array.shape[0]:
            raise CalibrationDataError(f"the calibration data for {spec.name} holds no samples")
        if samples is None:
            samples = int(array.shape[0])
        elif array.shape[0] != samples:
            raise CalibrationDataError(
                f"input {spec.name} has {array.shape[0]} samples, {inputs[0].name} has "
                f"{samples}: every input needs the same number"
            )
        if np.issubdtype(array.dtype, np.inexact):
            finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
            if not finite.all():
                raise CalibrationDataError(
                    f"input {spec.name} holds NaN or Inf (first in sample "
                    f"{int(np.argmin(finite))}): BatchNorm statistics need finite values"
                )
        checked[spec.name] = array
    return checked


def _check_shape(spec: ManifestTensor, shape: tuple[int, ...]) -> None:
    declared = "(" + ", ".join("?" if dim < 0 else str(dim) for dim in spec.shape) + ")"
    if len(shape) != len(spec.shape):
        raise CalibrationDataError(
            f"input {spec.name} has shape {shape}; the model takes {declared}, "
            f"{len(spec.shape)} axes with the samples on axis 0"
        )
    for axis, (dim, size) in enumerate(zip(spec.shape, shape, strict=True)):
        if axis > 0 and dim >= 0 and size != dim:
            raise CalibrationDataError(
                f"input {spec.name} has shape {shape}; the model takes {declared}: "
                f"axis {axis} must be {dim}"
            )


def data_sha256(arrays: Mapping[str, np.ndarray], inputs: Sequence[ManifestTensor]) -> str:
    """sha256 over each input's array bytes (C order), in the manifest's input order."""
    digest = hashlib.sha256()
    for spec in inputs:
        digest.update(memoryview(np.ascontiguousarray(arrays[spec.name])).cast("B"))
    return digest.hexdigest()
