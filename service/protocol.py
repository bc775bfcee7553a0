"""The KServe V2 / Open Inference Protocol types, Triton's extensions, and bnfold's compare.

These pydantic models describe the wire format for the OpenAPI document and for
tests that check responses against it. The request path does not validate
bodies with them: a tensor of a million numbers through pydantic costs more than
the inference. `codec` reads bodies with orjson and numpy instead and enforces
the same rules.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PLATFORM: Final = "onnxruntime_onnx"
BACKEND: Final = "onnxruntime"
INFERENCE_HEADER: Final = "Inference-Header-Content-Length"

# V2 datatype name <-> numpy dtype, for every datatype the service accepts.
# BYTES and BF16 have no numpy dtype and no use in BatchNorm models.
DATATYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_OF_DTYPE: Final = {dtype: name for name, dtype in DATATYPES.items()}

# onnxruntime's type strings, for checking a session against its manifest.
ONNX_TYPES: Final = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
Parameters = dict[str, Any]
TensorData = list[Any]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorResponse(_Wire):
    error: str = Field(examples=["unknown model 'digitz'"])


class ServerMetadataResponse(_Wire):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "bnfold",
                    "version": "0.1.0",
                    "extensions": ["binary_tensor_data", "model_repository", "model_configuration"],
                }
            ]
        }
    )

    name: str
    version: str
    extensions: list[str]


class LiveResponse(_Wire):
    live: bool


class ReadyResponse(_Wire):
    ready: bool


class ModelReadyResponse(_Wire):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "digits_mlp", "ready": True}]}
    )

    name: str
    ready: bool


class MetadataTensor(_Wire):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a dynamic axis (axis 0 is the batch).")


class ModelMetadataResponse(_Wire):
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
    parameters: Parameters = Field(
        description="bnfold extras: `version` described, `execution_providers` in use, "
        "`batchnorm_layers` compared by the compare endpoint."
    )


class RequestInput(_Wire):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None, description="`binary_data_size`: bytes of this tensor after the JSON header."
    )
    data: TensorData | None = Field(
        None, description="Row-major values, flat or nested; absent with binary data."
    )


class RequestOutput(_Wire):
    name: str
    parameters: Parameters | None = Field(
        None, description="`binary_data`: return this output as raw bytes after the JSON header."
    )


class InferenceRequest(_Wire):
    id: str | None = None
    parameters: Parameters | None = Field(
        None, description="`binary_data_output`: default for outputs without their own flag."
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(
        None, description="Outputs to return; all of them when absent."
    )


class ResponseOutput(_Wire):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = None
    data: TensorData | None = None


class InferenceResponse(_Wire):
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
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class CompareRequest(InferenceRequest):
    return_outputs: bool = Field(
        False, description="Also return both modes' outputs (JSON tensors)."
    )


class OutputComparison(_Wire):
    name: str
    shape: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    relative_l2_diff: float = Field(description="||train - eval|| / ||eval|| over the batch.")
    cosine_similarity: float = Field(description="Mean over samples of cos(eval, train).")
    cosine_similarity_min: float
    argmax_agreement: float | None = Field(
        None, description="Fraction of samples whose argmax agrees; for (N, K>1) outputs only."
    )


class Spread(_Wire):
    mean: float
    min: float
    max: float


class LayerDrift(_Wire):
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


class CompareResponse(_Wire):
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
    id: str | None = None
    batch_size: int
    outputs: list[OutputComparison]
    batchnorm: list[LayerDrift] = Field(description="Every BN layer, largest drift first.")
    eval_outputs: list[ResponseOutput] | None = None
    train_outputs: list[ResponseOutput] | None = None


class RepositoryIndexRequest(_Wire):
    ready: bool = Field(False, description="Only list ready models.")


class RepositoryModel(_Wire):
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


class RepositoryLoadRequest(_Wire):
    parameters: Parameters | None = None


class ModelConfigTensor(_Wire):
    name: str
    data_type: str = Field(examples=["TYPE_FP32"])
    dims: list[int]


class ModelConfigResponse(_Wire):
    """The subset of Triton's model configuration that describes an onnxruntime model."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits_mlp",
                    "platform": PLATFORM,
                    "backend": BACKEND,
                    "max_batch_size": 0,
                    "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
                    "output": [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1, 10]}],
                }
            ]
        }
    )

    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="0: dims include the batch axis (-1).")
    input: list[ModelConfigTensor]
    output: list[ModelConfigTensor]


WIRE_MODELS: Final[tuple[type[BaseModel], ...]] = (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    CompareRequest,
    CompareResponse,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
)
