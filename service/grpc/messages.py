"""The data plane's JSON answers as the protocol's messages: metadata, config, statistics, index.

The data plane answers REST in Triton's JSON; the gRPC messages have the same
fields (Triton defines its REST JSON from these protos), so `json_format.ParseDict`
converts them, with `ignore_unknown_fields` where our JSON carries extras the
proto has no field for (the model metadata's `parameters`). Nothing here
decides anything: a field added to the JSON shows up over gRPC when the proto
has it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2


def server_metadata(metadata: Mapping[str, Any]) -> service_pb2.ServerMetadataResponse:
    return json_format.ParseDict(metadata, service_pb2.ServerMetadataResponse())


def model_metadata(metadata: Mapping[str, Any]) -> service_pb2.ModelMetadataResponse:
    return json_format.ParseDict(
        metadata, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True
    )


def model_config(config: Mapping[str, Any]) -> service_pb2.ModelConfigResponse:
    parsed = json_format.ParseDict(
        config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
    )
    return service_pb2.ModelConfigResponse(config=parsed)


def model_statistics(statistics: Mapping[str, Any]) -> service_pb2.ModelStatisticsResponse:
    return json_format.ParseDict(
        statistics, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True
    )


def repository_index(entries: Sequence[Mapping[str, Any]]) -> service_pb2.RepositoryIndexResponse:
    return service_pb2.RepositoryIndexResponse(
        models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(
                name=entry["name"],
                version=entry["version"],
                state=entry["state"],
                reason=entry["reason"] or "",
            )
            for entry in entries
        ]
    )
