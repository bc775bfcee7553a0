"""The KServe V2 / Open Inference Protocol types, Triton's extensions, and bnfold's compare.

These pydantic models describe the wire format for the OpenAPI document and for
tests that check responses against it. The request path does not validate
bodies with them: a tensor of a million numbers through pydantic costs more than
the inference. `codec` reads bodies with orjson and numpy instead and enforces
the same rules.

Responses are closed: every field the server sends is declared, nothing else is
allowed, and a field the server leaves out when it has no value is never null.
tests/test_service_protocol.py validates every endpoint's real answer against
its model, so a field added, dropped or renamed on one side only fails there
(and in the OpenAPI fuzz test) instead of drifting from the documentation.
Requests stay open: the protocol lets clients send fields and `parameters` a
server does not know, and bnfold ignores them (the few it refuses are named
where they belong). V2 `parameters` are maps, so the ones bnfold sends are
TypedDicts: their keys are declared and checked, and they stay dicts
(`metadata.parameters["version"]`).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, with_config
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import NotRequired, TypedDict

from bnfold.package_format import DATATYPES, Datatype

PLATFORM: Final = "onnxruntime_onnx"
BACKEND: Final = "onnxruntime"
INFERENCE_HEADER: Final = "Inference-Header-Content-Length"

# The datatype table is the package format's (V2 name, numpy dtype, onnxruntime type).
ConfigDatatype = Literal[tuple(f"TYPE_{name}" for name in DATATYPES)]
Parameters = dict[str, Any]
TensorData = list[Any]
FlatData = list[bool | int | float | None]
"""Response tensor values, flat and row-major; NaN and infinity are written as null."""

_T = TypeVar("_T")


def _never_null(value: object) -> object:
    if value is None:
        raise ValueError("the server leaves this field out when it has no value, never null")
    return value


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


Omittable = Annotated[
    _T | SkipJsonSchema[None],
    BeforeValidator(_never_null),
    Field(json_schema_extra=_no_default),
]
"""A response field that is absent, not null, when it has no value (default it to None)."""


_CLOSED: Final = ConfigDict(extra="forbid")


class _Response(BaseModel):
    """What the server sends: closed, so a field it adds, drops or renames fails validation."""

    model_config = _CLOSED


class _Request(BaseModel):
    """What a client sends: open, as the protocol allows fields a server does not know."""

    model_config = ConfigDict(extra="allow")


class ErrorResponse(_Response):
    """Every error response, whatever its status."""

    error: str = Field(examples=["unknown model 'digitz'"])
    request_id: str | None = Field(
        None,
        description="The request's id (X-Request-ID), for finding its log lines.",
        examples=["3f9c2a7d1e4b8c60"],
    )


class ServerMetadataResponse(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "bnfold",
                    "version": "0.1.0",
                    "extensions": [
                        "binary_tensor_data",
                        "model_repository",
                        "model_configuration",
                        "statistics",
                        "bnfold_compare",
                        "bnfold_drift",
                    ],
                }
            ]
        }
    )

    name: str
    version: str
    extensions: list[str] = Field(
        description="Triton's extensions the server implements (`statistics`: GET "
        ".../stats), `bnfold_compare` (the compare endpoint) and `bnfold_drift` (the drift "
        "endpoint)."
    )


class LiveResponse(_Response):
    live: bool


class ReadyResponse(_Response):
    ready: bool


class ModelReadyResponse(_Response):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "digits_mlp", "ready": True}]}
    )

    name: str
    ready: bool


class MetadataTensor(_Response):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a dynamic axis (axis 0 is the batch).")


@with_config(_CLOSED)
class BatchingParameters(TypedDict):
    """The model's dynamic batching policy, as resolved when it loaded."""

    enabled: bool
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    disabled_reason: NotRequired[
        Annotated[str, Field(description="Why batching is off; only when it is.")]
    ]


@with_config(_CLOSED)
class ModelParameters(TypedDict):
    """bnfold's extras in model metadata."""

    version: Annotated[str, Field(description="The version described.")]
    execution_providers: Annotated[list[str], Field(description="onnxruntime's, in use.")]
    batchnorm_layers: Annotated[
        list[str], Field(description="The BatchNorm layers the compare endpoint reports on.")
    ]
    batching: BatchingParameters


class ModelMetadataResponse(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits_mlp",
                    "versions": ["1"],
                    "platform": PLATFORM,
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
                    "parameters": {
                        "version": "1",
                        "execution_providers": ["CPUExecutionProvider"],
                        "batchnorm_layers": ["body.1", "body.4", "head.0"],
                        "batching": {
                            "enabled": True,
                            "max_batch_size": 32,
                            "max_queue_delay_us": 0,
                            "max_queue_size": 256,
                        },
                    },
                }
            ]
        }
    )

    name: str
    versions: list[str] = Field(
        description="Ready versions; the highest answers unversioned calls."
    )
    platform: str = Field(examples=[PLATFORM])
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: ModelParameters


class RequestInput(_Request):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None,
        description="`binary_data_size`: bytes of this tensor after the JSON header. "
        "`shared_memory_region` is refused (400).",
    )
    data: TensorData | None = Field(
        None, description="Row-major values, flat or nested; absent with binary data."
    )


class RequestOutput(_Request):
    name: str
    parameters: Parameters | None = Field(
        None,
        description="`binary_data`: return this output as raw bytes after the JSON header. "
        "`shared_memory_region` and `classification` are refused (400).",
    )


class InferenceRequest(_Request):
    id: str | None = None
    parameters: Parameters | None = Field(
        None, description="`binary_data_output`: default for outputs without their own flag."
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(
        None, description="Outputs to return; all of them when absent."
    )


class JsonOutput(_Response):
    """An output with its values in the JSON."""

    name: str
    datatype: Datatype
    shape: list[int]
    data: FlatData


@with_config(_CLOSED)
class BinaryDataParameters(TypedDict):
    binary_data_size: Annotated[int, Field(description="Bytes of this output after the header.")]


class BinaryOutput(_Response):
    """An output asked for as `binary_data`: its raw bytes follow the JSON header, in order."""

    name: str
    datatype: Datatype
    shape: list[int]
    parameters: BinaryDataParameters


class InferenceResponse(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "digits_mlp",
                    "model_version": "1",
                    "id": "request-1",
                    "outputs": [
                        {
                            "name": "output",
                            "datatype": "FP32",
                            "shape": [1, 10],
                            "data": [
                                -1.06,
                                -2.08,
                                6.06,
                                -3.31,
                                5.04,
                                -3.48,
                                -2.78,
                                2.15,
                                1.69,
                                0.47,
                            ],
                        }
                    ],
                }
            ]
        }
    )

    model_name: str
    model_version: str
    id: Omittable[str] = Field(None, description="The request's id; absent when it had none.")
    outputs: list[JsonOutput | BinaryOutput]


class CompareRequest(InferenceRequest):
    parameters: Parameters | None = Field(
        None,
        description="`channels`: also return each BatchNorm layer's per-channel values "
        "(as `?channels=true`). `binary_data_output` is ignored: compare answers in JSON.",
    )
    return_outputs: bool = Field(
        False,
        description="Also return both modes' outputs (JSON tensors); as `?return_outputs=true`.",
    )


class OutputComparison(_Response):
    name: str
    shape: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    relative_l2_diff: float = Field(description="||train - eval|| / ||eval|| over the batch.")
    cosine_similarity: float = Field(description="Mean over samples of cos(eval, train).")
    cosine_similarity_min: float
    argmax_agreement: float | None = Field(
        description="Fraction of samples whose argmax agrees; null unless the output is (N, K>1)."
    )


class Spread(_Response):
    mean: float
    min: float
    max: float


class ChannelStatistics(_Response):
    """Per channel, in channel order: the drill-down behind a layer's spreads. Drift: the BN's
    input pooled over the window; compare: the batch statistics train.onnx normalises with."""

    mean: list[float] = Field(description="Mean of the BN's input (window or batch).")
    var: list[float] = Field(description="Biased variance of the BN's input (window or batch).")
    mean_shift: list[float] = Field(description="|mean - running mean| / sqrt(running var + eps).")
    kl_divergence: list[float] = Field(
        description="KL(N(mean, var) || N(running mean, running var)), in nats."
    )


class LayerDrift(_Response):
    name: str
    channels: int
    mean_shift: Spread = Field(
        description="|batch mean - running mean| / sqrt(running var + eps), over channels."
    )
    var_ratio: Spread = Field(
        description="(batch var + eps) / (running var + eps), over channels (1 = agreement)."
    )
    max_abs_log_var_ratio: float
    kl_divergence: Spread = Field(
        description="KL(N(batch) || N(running)) per channel, in nats: the sort key (mean)."
    )
    channel_statistics: Omittable[ChannelStatistics] = Field(
        None, description="Only with `?channels=true` (or `parameters.channels`)."
    )


class CompareResponse(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "digits_mlp",
                    "model_version": "1",
                    "batch_size": 16,
                    "outputs": [
                        {
                            "name": "output",
                            "shape": [16, 10],
                            "max_abs_diff": 15.59,
                            "mean_abs_diff": 3.77,
                            "relative_l2_diff": 0.565,
                            "cosine_similarity": 0.906,
                            "cosine_similarity_min": 0.818,
                            "argmax_agreement": 0.9375,
                        }
                    ],
                    "batchnorm": [
                        {
                            "name": "body.1",
                            "channels": 128,
                            "mean_shift": {"mean": 0.9, "min": 0.015, "max": 3.3},
                            "var_ratio": {"mean": 3.74, "min": 1.09, "max": 8.38},
                            "max_abs_log_var_ratio": 2.13,
                            "kl_divergence": {"mean": 1.44, "min": 0.093, "max": 6.54},
                        }
                    ],
                }
            ]
        }
    )

    model_name: str
    model_version: str
    id: Omittable[str] = Field(None, description="The request's id; absent when it had none.")
    batch_size: int
    outputs: list[OutputComparison]
    batchnorm: list[LayerDrift] = Field(description="Every BN layer, largest drift first.")
    eval_outputs: Omittable[list[JsonOutput]] = Field(
        None, description="model.onnx's outputs; only with `return_outputs`."
    )
    train_outputs: Omittable[list[JsonOutput]] = Field(
        None, description="train.onnx's outputs; only with `return_outputs`."
    )


class LayerWindowDrift(_Response):
    """One BN layer's input over the window against its running statistics (compare's
    measures); the measures are absent until it has two values per channel."""

    name: str
    channels: int
    values_per_channel: int = Field(
        description="Values pooled per channel in the window: sampled rows x spatial size."
    )
    mean_shift: Omittable[Spread] = Field(
        None, description="|live mean - running mean| / sqrt(running var + eps), over channels."
    )
    var_ratio: Omittable[Spread] = Field(
        None, description="(live var + eps) / (running var + eps), over channels (1 = agreement)."
    )
    max_abs_log_var_ratio: Omittable[float] = None
    kl_divergence: Omittable[Spread] = Field(
        None, description="KL(N(live) || N(running)) per channel, in nats: the sort key (mean)."
    )
    drifted: bool = Field(description="The mean KL exceeds the threshold.")
    channel_statistics: Omittable[ChannelStatistics] = Field(
        None, description="Only with `?channels=true`."
    )


class DriftVerdict(_Response):
    status: Literal["ok", "drifted", "insufficient_data"] = Field(
        description="insufficient_data while a layer has fewer than 2 values per channel in "
        "the window; else drifted when any layer's mean KL exceeds the threshold; else ok."
    )
    drifted_layers: int
    layers: int


class DriftResponse(_Response):
    """Live traffic against the package's running statistics, over the sliding window."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "digits_mlp",
                    "model_version": "1",
                    "available": True,
                    "sample_fraction": 0.01,
                    "window_seconds": 300.0,
                    "kl_threshold": 0.1,
                    "samples": 412,
                    "requests_sampled": 412,
                    "dropped": 0,
                    "verdict": {"status": "drifted", "drifted_layers": 1, "layers": 3},
                    "layers": [
                        {
                            "name": "body.1",
                            "channels": 128,
                            "values_per_channel": 412,
                            "mean_shift": {"mean": 0.62, "min": 0.01, "max": 2.1},
                            "var_ratio": {"mean": 1.9, "min": 0.8, "max": 4.2},
                            "max_abs_log_var_ratio": 1.44,
                            "kl_divergence": {"mean": 0.41, "min": 0.002, "max": 2.7},
                            "drifted": True,
                        }
                    ],
                },
                {
                    "model_name": "old_model",
                    "model_version": "1",
                    "available": False,
                    "reason": "the package has schema version 1, which predates "
                    "calibration.onnx: convert the model again (bnfold convert) to monitor "
                    "its drift",
                    "sample_fraction": 0.01,
                    "window_seconds": 300.0,
                    "kl_threshold": 0.1,
                },
            ]
        }
    )

    model_name: str
    model_version: str
    available: bool = Field(description="Whether this version is monitored.")
    reason: Omittable[str] = Field(None, description="Why not; only when unavailable.")
    sample_fraction: float
    window_seconds: float
    kl_threshold: float = Field(description="A layer drifted above this mean KL (nats).")
    samples: Omittable[int] = Field(None, description="Sampled input rows in the window.")
    requests_sampled: Omittable[int] = Field(None, description="Sampled requests in the window.")
    dropped: Omittable[int] = Field(
        None,
        description="Sampled requests not measured since the version loaded (the monitor's "
        "queue was full, or the run failed).",
    )
    verdict: Omittable[DriftVerdict] = None
    layers: Omittable[list[LayerWindowDrift]] = Field(
        None, description="Every BN layer, largest mean KL first; layers without data last."
    )


class PackageReportResponse(_Response):
    """The package a version serves, as the server verified and loaded it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "digits_mlp",
                    "model_version": "2",
                    "manifest": {
                        "schema_version": 2,
                        "name": "digits_mlp",
                        "version": 2,
                        "created": "2026-12-02T11:20:41+00:00",
                        "source": {"kind": "builtin", "ref": "digits_mlp", "sha256": "df2c7d18…"},
                        "tool_versions": {"bnfold": "0.1.0", "onnxruntime": "1.32.0", "opset": 17},
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
                        "batchnorm": {
                            "total": 2,
                            "folded": [
                                {"name": "body.1", "into": "body.0", "direction": "forward"},
                                {"name": "head.0", "into": "head.2", "direction": "backward"},
                            ],
                            "kept": [],
                            "layers": [
                                {
                                    "name": "body.1",
                                    "channels": 2,
                                    "eps": 1e-05,
                                    "channel_axis": 1,
                                    "input_rank": 2,
                                    "running_mean": [-0.183, 0.0695],
                                    "running_var": [0.129, 0.0843],
                                    "batch_mean_output": "body.1.batch_mean",
                                    "batch_var_output": "body.1.batch_var",
                                }
                            ],
                        },
                        "batching": {},
                        "files": {
                            "calibration.onnx": "c9d35e3f…",
                            "model.onnx": "82f9ea64…",
                            "train.onnx": "eac358e2…",
                        },
                        "recalibrations": [
                            {
                                "from_version": 1,
                                "method": "sequential",
                                "samples": 300,
                                "data_sha256": "4f1b2c9e…",
                                "data": "a .npy request body",
                                "created": "2026-12-02T11:20:41+00:00",
                            }
                        ],
                        "verification": {
                            "eval": {"max_abs_err": 6.1e-06, "samples": 21, "passed": True},
                            "train": {"max_abs_err": 3.7e-06, "samples": 276, "passed": True},
                            "max_abs_err": 6.1e-06,
                            "passed": True,
                            "tolerance": {"atol": 1e-05, "rtol": 0.0001},
                        },
                        "node_counts": {"batchnorm_before": 2, "batchnorm_after": 0},
                    },
                }
            ]
        }
    )

    model_name: str
    model_version: str
    manifest: dict[str, Any] = Field(
        description="manifest.json as the version was loaded with it (fields without a value "
        "left out; docs/package-format.md): `batchnorm.folded` (name, into, direction), "
        "`batchnorm.kept` (name, reason), `batchnorm.layers` (running statistics), "
        "`verification`, `inputs`/`outputs`, `source`, `tool_versions`, `created`, "
        "`recalibrations` (oldest first), `files` (sha256 each)."
    )


class RepositoryIndexRequest(_Request):
    ready: bool = Field(False, description="Only list ready models.")


class RepositoryModel(_Response):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits_mlp",
                    "version": "2",
                    "state": "UNAVAILABLE",
                    "reason": "sha256 of model.onnx is 44e10b1cc47f…, the manifest says 9d3f40eaf63f…",
                }
            ]
        }
    )

    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class RepositoryLoadRequest(_Request):
    parameters: Parameters | None = Field(
        None,
        description="Triton's load parameters. A model load takes `config`: Triton's model "
        "configuration as a JSON string (tritonclient's `load_model(name, config=...)`), of "
        "which bnfold honours max_batch_size and dynamic_batching's "
        "max_queue_delay_microseconds, preferred_batch_size and "
        "default_queue_policy.max_queue_size (any other field: 400 naming it); it lasts until "
        "the next load without one. Any other parameter (Triton's `file:` uploads) is refused "
        "(400): packages come from the repository on disk. A version load takes none; unload "
        "ignores them.",
    )


class ModelConfigTensor(_Response):
    name: str
    data_type: ConfigDatatype = Field(examples=["TYPE_FP32"])
    dims: list[int]


class LatestVersions(_Response):
    num_versions: int


class VersionPolicy(_Response):
    latest: LatestVersions


class InstanceGroup(_Response):
    name: str
    kind: Literal["KIND_CPU", "KIND_GPU"]
    count: int


class QueuePolicy(_Response):
    max_queue_size: int


class DynamicBatching(_Response):
    preferred_batch_size: list[int] = Field(
        description="The preferred batch sizes a load's config set, else the policy's "
        "max_batch_size."
    )
    max_queue_delay_microseconds: int
    default_queue_policy: QueuePolicy


class WarmupInput(_Response):
    data_type: ConfigDatatype = Field(examples=["TYPE_FP32"])
    dims: list[int] = Field(description="The full shape, batch axis included.")
    zero_data: Literal[True]


class WarmupSample(_Response):
    """One warm-up run of model.onnx (Triton's `model_warmup` entry): zeros of `dims`."""

    name: str = Field(examples=["zeros_32_rows"])
    batch_size: Literal[1] = Field(description="1: the rows are in `dims` (max_batch_size 0).")
    count: Literal[1]
    inputs: dict[str, WarmupInput]


@with_config(_CLOSED)
class StringValue(TypedDict):
    string_value: str


@with_config(_CLOSED)
class ConfigParameters(TypedDict):
    execution_providers: Annotated[
        StringValue, Field(description="onnxruntime's providers in use, comma-separated.")
    ]


class ModelConfigResponse(_Response):
    """The subset of Triton's model configuration that describes an onnxruntime model."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits_mlp",
                    "platform": PLATFORM,
                    "backend": BACKEND,
                    "version_policy": {"latest": {"num_versions": 1}},
                    "max_batch_size": 0,
                    "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
                    "output": [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1, 10]}],
                    "instance_group": [{"name": "digits_mlp", "kind": "KIND_CPU", "count": 1}],
                    "default_model_filename": "model.onnx",
                    "parameters": {"execution_providers": {"string_value": "CPUExecutionProvider"}},
                    "dynamic_batching": {
                        "preferred_batch_size": [32],
                        "max_queue_delay_microseconds": 0,
                        "default_queue_policy": {"max_queue_size": 256},
                    },
                }
            ]
        }
    )

    name: str
    platform: str
    backend: str
    version_policy: VersionPolicy
    max_batch_size: int = Field(description="0: dims include the batch axis (-1).")
    input: list[ModelConfigTensor]
    output: list[ModelConfigTensor]
    instance_group: list[InstanceGroup]
    default_model_filename: str
    parameters: ConfigParameters
    dynamic_batching: Omittable[DynamicBatching] = Field(
        None, description="Only when the model batches (its metadata says why not otherwise)."
    )
    model_warmup: Omittable[list[WarmupSample]] = Field(
        None,
        description="The warm-up runs of model.onnx made before the version reported READY "
        "(absent with --no-warmup, or when no row fits the body limit).",
    )


class StatisticDuration(_Response):
    """A count and its total time: sample it twice for the average between the samples."""

    count: int = Field(ge=0, description="How many times it happened.")
    ns: int = Field(ge=0, description="Their total duration in nanoseconds.")


class InferStatistics(_Response):
    """Per request, Triton's fields; the counts of queue and compute_* are the successes."""

    success: StatisticDuration = Field(
        description="Successful requests, whole: tensors read, queued, run, response written."
    )
    fail: StatisticDuration = Field(
        description="Requests that failed once their model version was known: tensors that do "
        "not fit (422), a full queue (503), a failed run, a client gone (cancelled). A body "
        "that cannot be read (400) is not counted, as in Triton."
    )
    queue: StatisticDuration = Field(
        description="Waiting in the batcher's queue, from entering it to its run starting."
    )
    compute_input: StatisticDuration = Field(
        description="Reading the request's tensors into arrays and merging them into the run's "
        "batch."
    )
    compute_infer: StatisticDuration = Field(
        description="The onnxruntime run (a merged run's whole time, for each of its requests)."
    )
    compute_output: StatisticDuration = Field(
        description="Splitting the run's outputs per request and writing the response."
    )
    cache_hit: StatisticDuration = Field(description="Always zero: no response cache.")
    cache_miss: StatisticDuration = Field(description="Always zero: no response cache.")


class InferBatchStatistics(_Response):
    """The runs of one batch size (rows after the batcher merged requests)."""

    batch_size: int = Field(ge=1)
    compute_input: StatisticDuration = Field(description="Merging the requests' inputs.")
    compute_infer: StatisticDuration = Field(description="The onnxruntime runs.")
    compute_output: StatisticDuration = Field(description="Splitting the outputs per request.")


class ModelStatistics(_Response):
    """One loaded model version since it was loaded (a reload starts from zero)."""

    name: str
    version: str
    last_inference: int = Field(
        description="When its last run finished, in milliseconds since the epoch (0: never)."
    )
    inference_count: int = Field(
        description="Rows (axis 0) of the successful requests: one request of 64 rows counts 64."
    )
    execution_count: int = Field(
        description="onnxruntime runs; requests the batcher merged count once."
    )
    inference_stats: InferStatistics
    batch_stats: list[InferBatchStatistics] = Field(description="By batch size, ascending.")


class ModelStatisticsResponse(_Response):
    """Triton's statistics extension (its gRPC ModelStatisticsResponse as JSON)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_stats": [
                        {
                            "name": "digits_mlp",
                            "version": "1",
                            "last_inference": 1764672000000,
                            "inference_count": 6,
                            "execution_count": 2,
                            "inference_stats": {
                                "success": {"count": 3, "ns": 910000},
                                "fail": {"count": 0, "ns": 0},
                                "queue": {"count": 3, "ns": 120000},
                                "compute_input": {"count": 3, "ns": 60000},
                                "compute_infer": {"count": 3, "ns": 300000},
                                "compute_output": {"count": 3, "ns": 45000},
                                "cache_hit": {"count": 0, "ns": 0},
                                "cache_miss": {"count": 0, "ns": 0},
                            },
                            "batch_stats": [
                                {
                                    "batch_size": 2,
                                    "compute_input": {"count": 1, "ns": 0},
                                    "compute_infer": {"count": 1, "ns": 100000},
                                    "compute_output": {"count": 1, "ns": 0},
                                },
                                {
                                    "batch_size": 4,
                                    "compute_input": {"count": 1, "ns": 8000},
                                    "compute_infer": {"count": 1, "ns": 100000},
                                    "compute_output": {"count": 1, "ns": 3000},
                                },
                            ],
                        }
                    ]
                }
            ]
        }
    )

    model_stats: list[ModelStatistics]


WIRE_MODELS: Final[tuple[type[BaseModel], ...]] = (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    CompareRequest,
    CompareResponse,
    DriftResponse,
    PackageReportResponse,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
)
