"""The GRPCInferenceService: each RPC reads its message and hands it to the `DataPlane`.

The gRPC twin of `rest/routes.py`, on the same data plane, batcher, metrics,
decode budget and admin token: no RPC validates, looks up or runs anything
itself, and each error is one of the service's, turned into a status in one
place (`status`). ModelInfer is admitted (server and model ready, room in the
queue) before its tensors are decoded, holds its decode cost from the
process's decode budget until its response is built, and is counted in the
metrics under endpoint `grpc_infer` with the HTTP status its outcome would
have had, so one dashboard reads both transports.

Where the protocol fixes an answer, it is Triton's: ModelReady answers
`ready: false` for an unknown or unready model (no error), a stream reports a
request's error in its response's `error_message` and goes on. What bnfold
does not do (shared memory, trace and log settings) is UNIMPLEMENTED with a
message saying what to do instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import grpc.aio
from pydantic import SecretStr
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bnfold.service.access_log import AccessLog
from bnfold.service.dataplane import DataPlane
from bnfold.service.errors import BadRequest, NotFound, Unavailable
from bnfold.service.grpc import messages
from bnfold.service.grpc.access import logs_calls
from bnfold.service.grpc.admin import check_admin_token
from bnfold.service.grpc.status import reports_errors, service_error
from bnfold.service.grpc.tensors import (
    decode_cost,
    decode_inputs,
    encode_response,
    requested_outputs,
)
from bnfold.service.load_config import decode_config_parameter
from bnfold.service.request_log import note_model
from bnfold.service.rest.bodies import DecodeBudget, run_sized
from bnfold.service.tracing import NO_SPAN, RequestSpan

Context = grpc.aio.ServicerContext
ENDPOINT = "grpc_infer"
LOAD_CONFIG_PARAMETER = "config"


def _version(text: str) -> str | None:
    """The protocol's empty version is "the version the policy picks", our None."""
    return text or None


def _check_repository_name(repository_name: str) -> None:
    if repository_name:
        raise BadRequest(
            f"repository_name {repository_name!r}: bnfold serves one repository; leave it empty"
        )


def load_config(
    parameters: Mapping[str, service_pb2.ModelRepositoryParameter],
) -> Mapping[str, Any] | None:
    """RepositoryModelLoad's `config` parameter (Triton's JSON config override, as
    tritonclient's `load_model(config=...)` sends it), parsed; None without one. Files
    (`file:` parameters) are refused: packages come from the repository on disk."""
    others = sorted(name for name in parameters if name != LOAD_CONFIG_PARAMETER)
    if others:
        raise BadRequest(
            "load takes no parameters but 'config': packages come from the repository on "
            f"disk, not from the request (got {', '.join(others)})"
        )
    if LOAD_CONFIG_PARAMETER not in parameters:
        return None
    parameter = parameters[LOAD_CONFIG_PARAMETER]
    choice = parameter.WhichOneof("parameter_choice")
    return decode_config_parameter(getattr(parameter, choice) if choice else None)


def _unimplemented(what: str, instead: str) -> str:
    return f"bnfold does not implement {what}: {instead}"


@logs_calls
class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe V2 over gRPC, with Triton's repository, configuration and statistics extensions;
    every call with a request id and, given an `access_log`, an access line (`access`)."""

    def __init__(
        self,
        dataplane: DataPlane,
        decode_budget: DecodeBudget,
        admin_token: SecretStr | None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.decode_budget = decode_budget
        self.admin_token = admin_token
        self.access_log = access_log

    # ------------------------------------------------------------ health and metadata

    @reports_errors
    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: Context
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    @reports_errors
    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: Context
    ) -> service_pb2.ServerReadyResponse:
        try:
            self.dataplane.check_server_ready()  # no while loading, draining, shutting down
        except Unavailable:
            return service_pb2.ServerReadyResponse(ready=False)
        return service_pb2.ServerReadyResponse(ready=True)

    @reports_errors
    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Context
    ) -> service_pb2.ModelReadyResponse:
        try:
            self.dataplane.model_ready(request.name, _version(request.version))
        except (NotFound, Unavailable):
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @reports_errors
    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: Context
    ) -> service_pb2.ServerMetadataResponse:
        return messages.server_metadata(self.dataplane.server_metadata())

    @reports_errors
    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Context
    ) -> service_pb2.ModelMetadataResponse:
        metadata = self.dataplane.model_metadata(request.name, _version(request.version))
        return messages.model_metadata(metadata)

    @reports_errors
    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: Context
    ) -> service_pb2.ModelConfigResponse:
        config = self.dataplane.model_config(request.name, _version(request.version))
        return messages.model_config(config)

    @reports_errors
    async def ModelStatistics(
        self, request: service_pb2.ModelStatisticsRequest, context: Context
    ) -> service_pb2.ModelStatisticsResponse:
        """Every model's statistics for an empty name, as Triton."""
        statistics = self.dataplane.model_statistics(
            request.name or None, _version(request.version)
        )
        return messages.model_statistics(statistics)

    # ------------------------------------------------------------ inference

    @reports_errors
    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: Context
    ) -> service_pb2.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest], context: Context
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Triton's bidirectional stream: each request answered in turn, in order; a failed
        one gets its error in `error_message` and the stream goes on."""
        async for request in request_iterator:
            try:
                response = await self._infer(request, context)
            except Exception as exc:
                error = service_error(exc, "ModelStreamInfer")
                failed = service_pb2.ModelInferResponse(
                    model_name=request.model_name,
                    model_version=request.model_version,
                    id=request.id,
                )
                yield service_pb2.ModelStreamInferResponse(
                    error_message=error.message, infer_response=failed
                )
            else:
                yield service_pb2.ModelStreamInferResponse(infer_response=response)

    async def _infer(
        self, request: service_pb2.ModelInferRequest, context: Context
    ) -> service_pb2.ModelInferResponse:
        """Admit, decode within the decode budget, `DataPlane.predict`, encode; statistics
        as `predict` documents. A call the client cancels is cancelled here too: dropped
        from the queue if it has not run (the batcher counts it)."""
        dataplane = self.dataplane
        name, version = request.model_name, _version(request.model_version)
        tracing = dataplane.tracing
        span = (
            NO_SPAN
            if tracing is None
            else RequestSpan(
                tracing, "infer", "grpc", name, version, dict(context.invocation_metadata() or ())
            )
        )
        span.identify(request.id or None)
        with span, dataplane.metrics.track(dataplane.model_label(name), ENDPOINT):
            dataplane.admit_infer(name, version)
            with self.decode_budget.share() as share:
                share.hold(decode_cost(request), "decoding this request")
                reading = time.perf_counter_ns()
                inputs = await run_sized(share.cost, decode_inputs, request)
                output_names = requested_outputs(request)
                decode_ns = time.perf_counter_ns() - reading
                span.decoded(decode_ns)
                prediction = await dataplane.predict(name, version, inputs, output_names)
                note_model(prediction.model.name, prediction.model.version)
                span.predicted(prediction)
                encoding = time.perf_counter_ns()
                try:
                    response = await run_sized(
                        sum(array.nbytes for array in prediction.arrays),
                        encode_response,
                        prediction.model.name,
                        str(prediction.model.version),
                        request.id,
                        prediction.output_names,
                        prediction.arrays,
                    )
                except Exception:
                    dataplane.record_failure(prediction, time.perf_counter_ns() - reading)
                    raise
                encode_ns = time.perf_counter_ns() - encoding
                dataplane.record_success(prediction, decode_ns, encode_ns)
                span.encoded(encode_ns)
            return response

    # ------------------------------------------------------------ repository (admin)

    @reports_errors
    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, context: Context
    ) -> service_pb2.RepositoryIndexResponse:
        _check_repository_name(request.repository_name)
        return messages.repository_index(self.dataplane.repository_index(request.ready))

    @reports_errors
    async def RepositoryModelLoad(
        self, request: service_pb2.RepositoryModelLoadRequest, context: Context
    ) -> service_pb2.RepositoryModelLoadResponse:
        self._check_admin(context)
        _check_repository_name(request.repository_name)
        await self.dataplane.load(request.model_name, load_config(request.parameters))
        return service_pb2.RepositoryModelLoadResponse()

    @reports_errors
    async def RepositoryModelUnload(
        self, request: service_pb2.RepositoryModelUnloadRequest, context: Context
    ) -> service_pb2.RepositoryModelUnloadResponse:
        """Parameters (Triton's `unload_dependents`) are ignored: a bnfold model has none."""
        self._check_admin(context)
        _check_repository_name(request.repository_name)
        await self.dataplane.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    def _check_admin(self, context: Context) -> None:
        metadata = context.invocation_metadata() or ()
        authorization = next((value for key, value in metadata if key == "authorization"), None)
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        check_admin_token(self.admin_token, authorization)

    # ------------------------------------------------------------ what bnfold does not do

    async def SystemSharedMemoryStatus(self, request: object, context: Context) -> None:
        await self._unsupported_shared_memory(context, "system")

    async def SystemSharedMemoryRegister(self, request: object, context: Context) -> None:
        await self._unsupported_shared_memory(context, "system")

    async def SystemSharedMemoryUnregister(self, request: object, context: Context) -> None:
        await self._unsupported_shared_memory(context, "system")

    async def CudaSharedMemoryStatus(self, request: object, context: Context) -> None:
        await self._unsupported_shared_memory(context, "CUDA")

    async def CudaSharedMemoryRegister(self, request: object, context: Context) -> None:
        await self._unsupported_shared_memory(context, "CUDA")

    async def CudaSharedMemoryUnregister(self, request: object, context: Context) -> None:
        await self._unsupported_shared_memory(context, "CUDA")

    async def _unsupported_shared_memory(self, context: Context, kind: str) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented(
                f"the {kind} shared memory extension",
                "send the tensors in the request (raw_input_contents)",
            ),
        )

    async def TraceSetting(self, request: object, context: Context) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented(
                "Triton's trace extension",
                "bnfold exports OpenTelemetry spans instead (--otlp-endpoint)",
            ),
        )

    async def LogSettings(self, request: object, context: Context) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented("Triton's logging extension", "set --log-level when starting"),
        )
