"""The model package format: the one contract between the converter and the service.

Everything both halves must agree on lives here and nowhere else: the file
names of a package, the version rule, the KServe V2 datatype table, how files
are hashed, how train.onnx and calibration.onnx name their per-BatchNorm
statistic inputs and outputs, and the manifest itself as pydantic models. The
converters build a `Manifest`; the service and `bnfold inspect` read one
through `parse_manifest`. The prose version of the contract is
docs/package-format.md.

Imports neither torch nor a web framework: the serving install (no torch) and
the converter (no FastAPI needed) both use it.

Reading is lenient where old packages need it: every model keeps fields it does
not know (`extra="allow"`), so a package written by a newer converter with
more fields still loads, and schema version 1 (no calibration.onnx) still
reads: such a package serves, without drift monitoring or recalibration.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST: Final = "manifest.json"
#: REPO/NAME/config.json: the operator's settings for every version of NAME (not hashed).
MODEL_CONFIG: Final = "config.json"
EVAL_GRAPH: Final = "model.onnx"
TRAIN_GRAPH: Final = "train.onnx"
#: Schema 2: the unfolded eval graph with per-BatchNorm input statistics (drift, recalibration).
CALIBRATION_GRAPH: Final = "calibration.onnx"
#: The schema this converter writes. Version 1 packages (no calibration.onnx) still serve.
SCHEMA_VERSION: Final = 2
#: The first schema whose packages carry CALIBRATION_GRAPH.
CALIBRATION_SCHEMA: Final = 2

# ---------------------------------------------------------------- versions

#: Versions are what Triton's clients can send: positive, within a signed 64-bit integer.
MAX_VERSION: Final = 2**63 - 1


def parse_version(text: str) -> int | None:
    """The version `text` spells (ASCII digits, 1..MAX_VERSION), else None. Leading zeros
    are accepted here (a request for version `01`); `is_version_name` refuses them."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(MAX_VERSION)):
        return None
    number = int(text)
    return number if 1 <= number <= MAX_VERSION else None


def is_version_name(text: str) -> bool:
    """Whether a directory name is a package version: `parse_version` without leading zeros
    (`007` is not a package, so one version has one directory)."""
    return parse_version(text) is not None and text == str(int(text))


def version_problem(version: int) -> str | None:
    """Why `version` cannot be a package version, or None."""
    if 1 <= version <= MAX_VERSION:
        return None
    return f"invalid version {version}: a version is an integer from 1 to {MAX_VERSION} (2**63 - 1)"


# ---------------------------------------------------------------- datatypes

# Every tensor datatype a package may declare: KServe V2 name, numpy scalar type, and the
# type string onnxruntime reports. BYTES and BF16 have no numpy dtype and no use here.
_DATATYPE_TABLE: Final = (
    ("BOOL", np.bool_, "tensor(bool)"),
    ("UINT8", np.uint8, "tensor(uint8)"),
    ("UINT16", np.uint16, "tensor(uint16)"),
    ("UINT32", np.uint32, "tensor(uint32)"),
    ("UINT64", np.uint64, "tensor(uint64)"),
    ("INT8", np.int8, "tensor(int8)"),
    ("INT16", np.int16, "tensor(int16)"),
    ("INT32", np.int32, "tensor(int32)"),
    ("INT64", np.int64, "tensor(int64)"),
    ("FP16", np.float16, "tensor(float16)"),
    ("FP32", np.float32, "tensor(float)"),
    ("FP64", np.float64, "tensor(double)"),
)
#: V2 name -> numpy dtype.
DATATYPES: Final[dict[str, np.dtype[Any]]] = {
    name: np.dtype(scalar) for name, scalar, _ in _DATATYPE_TABLE
}
#: numpy dtype -> V2 name.
DATATYPE_OF_DTYPE: Final = {dtype: name for name, dtype in DATATYPES.items()}
#: onnxruntime's type string (`NodeArg.type`) -> V2 name.
ONNX_TYPES: Final = {onnx_type: name for name, _, onnx_type in _DATATYPE_TABLE}
# The names as a type, for validation and OpenAPI enums. Built from the table:
# pydantic reads the enum, a static type checker cannot (a Literal of an expression).
Datatype = Literal[tuple(DATATYPES)]

# ---------------------------------------------------------------- hashing and names


def sha256_bytes(content: bytes | memoryview) -> str:
    return hashlib.sha256(content).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def batch_stat_output_names(layer_name: str) -> tuple[str, str]:
    """train.onnx's outputs for one BN: its batch mean and (biased) batch variance, [C] each."""
    return f"{layer_name}.batch_mean", f"{layer_name}.batch_var"


def running_stat_input_names(layer_name: str) -> tuple[str, str]:
    """calibration.onnx's overridable inputs for one BN: the running mean and variance it
    normalises with, float32 [C], each with an initializer of the same name holding the
    package's values (feed them to evaluate the model with other statistics)."""
    return f"{layer_name}.running_mean", f"{layer_name}.running_var"


def input_stat_output_names(layer_name: str) -> tuple[str, str, str]:
    """calibration.onnx's outputs for one BN: the mean and the biased variance of the BN's
    *input* over N and the spatial axes of the run (float32 [C]), and the number of values
    per channel they summarise (int64 scalar: N x spatial size), so runs pool exactly."""
    return f"{layer_name}.input_mean", f"{layer_name}.input_var", f"{layer_name}.input_count"


# ---------------------------------------------------------------- the manifest


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ManifestTensor(_Part):
    """A graph input or output: name, V2 datatype, shape with -1 for a dynamic axis."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...]

    @model_validator(mode="after")
    def _dims(self) -> ManifestTensor:
        if any(dim < -1 for dim in self.shape):
            raise ValueError(f"tensor {self.name!r}: dims are -1 (dynamic) or >= 0")
        return self


class ManifestLayer(_Part):
    """One BatchNorm of the source model with its running statistics (folded or kept)."""

    name: str
    channels: int = Field(gt=0)
    eps: float = Field(ge=0)
    channel_axis: int = 1
    input_rank: int | None = Field(None, ge=2)
    running_mean: tuple[float, ...]
    running_var: tuple[float, ...]
    batch_mean_output: str
    batch_var_output: str

    @model_validator(mode="after")
    def _statistics(self) -> ManifestLayer:
        if len(self.running_mean) != self.channels or len(self.running_var) != self.channels:
            raise ValueError(f"layer {self.name!r}: running statistics need {self.channels} values")
        if any(var < 0 for var in self.running_var):
            raise ValueError(f"layer {self.name!r}: negative running variance")
        return self


class FoldedEntry(_Part):
    name: str
    into: str
    direction: Literal["forward", "backward"]


class KeptEntry(_Part):
    name: str
    reason: str


class ManifestBatchNorm(_Part):
    total: int = Field(0, ge=0)
    folded: tuple[FoldedEntry, ...] = ()
    kept: tuple[KeptEntry, ...] = ()
    layers: tuple[ManifestLayer, ...] = ()


class BatchingFields(BaseModel):
    """Dynamic batching settings, as a package (manifest.json) or an operator (config.json) sets them.

    Every field is optional: one left out falls through to the next source
    (REPO/NAME/config.json, then the manifest, then the server's settings).
    Unknown fields are errors, so a typo never silently leaves the defaults on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=0)
    max_queue_delay_us: int | None = Field(None, ge=0, le=1_000_000)
    max_queue_size: int | None = Field(None, ge=1)


class ModelConfig(BaseModel):
    """REPO/NAME/config.json: the operator's settings for every version of NAME."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batching: BatchingFields = BatchingFields()
    #: Under the server's `specific` version policy: the version unversioned requests hit.
    default_version: int | None = Field(None, gt=0, le=MAX_VERSION)


class Source(_Part):
    kind: Literal["builtin", "factory", "pickle", "onnx"]
    ref: str
    sha256: str | None = None
    weights_sha256: str | None = None


class Recalibration(_Part):
    """One `bnfold recalibrate` step that produced this package from an earlier version."""

    from_version: int = Field(gt=0, le=MAX_VERSION)
    method: Literal["sequential", "batch"]
    samples: int = Field(gt=0)
    data_sha256: str
    data: str | None = None
    created: str | None = None


class Manifest(_Part):
    """manifest.json. The converters fill every field; the service relies on the typed ones
    and keeps the rest as they are (`verification`, `node_counts`, ... are free-form
    blocks documented in docs/package-format.md)."""

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    name: str
    version: int = Field(gt=0, le=MAX_VERSION)
    created: str | None = None
    source: Source | None = None
    tool_versions: dict[str, str | int] = {}
    inputs: tuple[ManifestTensor, ...] = Field(min_length=1)
    outputs: tuple[ManifestTensor, ...] = Field(min_length=1)
    batchnorm: ManifestBatchNorm = ManifestBatchNorm()
    batching: BatchingFields = BatchingFields()
    files: dict[str, str]
    #: Every recalibration that led to this package, oldest first (empty for a conversion).
    recalibrations: tuple[Recalibration, ...] = ()

    @model_validator(mode="after")
    def _calibration_graph(self) -> Manifest:
        if self.schema_version >= CALIBRATION_SCHEMA and CALIBRATION_GRAPH not in self.files:
            raise ValueError(
                f"schema version {self.schema_version} packages list {CALIBRATION_GRAPH} in files"
            )
        return self

    @property
    def has_calibration_graph(self) -> bool:
        """Schema 1 packages predate calibration.onnx: they serve, without drift or recalibration."""
        return self.schema_version >= CALIBRATION_SCHEMA

    def to_json(self) -> bytes:
        """The manifest as written: indented, fields left unset out, a final newline."""
        return (
            orjson.dumps(
                self.model_dump(mode="json", exclude_none=True), option=orjson.OPT_INDENT_2
            )
            + b"\n"
        )


class ManifestError(ValueError):
    """manifest.json (or config.json) cannot be read as the format says; the message says why."""


def _validation_reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}"


_Parsed = TypeVar("_Parsed", bound=BaseModel)


def _parse(model: type[_Parsed], raw: bytes, what: str, kind: str) -> _Parsed:
    try:
        return model.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise ManifestError(f"{what} {kind}: {_validation_reason(exc)}") from None


def parse_manifest(raw: bytes) -> Manifest:
    """Parse manifest.json's bytes; raises `ManifestError` naming the first problem."""
    return _parse(Manifest, raw, MANIFEST, "does not follow the package format")


def parse_model_config(raw: bytes, where: str) -> ModelConfig:
    """Parse REPO/NAME/config.json; raises `ManifestError` naming `where` and the problem."""
    return _parse(ModelConfig, raw, where, "is not a model configuration")
