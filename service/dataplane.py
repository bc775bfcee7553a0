"""The data plane: find the model, check the request against it, run it. No HTTP here.

A request goes decode (the transport: REST's codec, gRPC's messages) ->
`DataPlane.predict`: look the model up, check the tensors against the
manifest (`check_inputs`, 422 on a mismatch), then hand the validated feeds to
the `Batcher`, which queues them per model version and runs them, merged with
other requests' rows when the model's policy allows, on its run threads
(onnxruntime releases the GIL, so runs overlap while the event loop keeps
serving); the transport encodes the `Prediction` it returns and reports what
its decode and encode cost (`record_success`) for the statistics extension
(`model_statistics`, Triton's). Compare never batches: train.onnx normalises
with the statistics of the whole batch, so other requests' rows would change
the answer; it runs through a plain `Runner`.

Drift monitoring: `predict` offers every checked request to the
`DriftMonitor` before the batcher merges it (an addition and a comparison per
request; one in 1/fraction is queued for the monitor's worker), and `drift`
answers from the monitor's windows. Neither changes what infer or compare
return.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, NoReturn

import numpy as np
from prometheus_client.core import Metric

from bnfold.package_format import DATATYPE_OF_DTYPE, ManifestTensor, parse_version
from bnfold.service import compare
from bnfold.service.batching import Batcher
from bnfold.service.codec import DecodedRequest, tensor_json
from bnfold.service.drain import DrainState
from bnfold.service.drift_monitor import DriftConfig, DriftMonitor
from bnfold.service.errors import NotFound, QueueFull, Unavailable, Unprocessable
from bnfold.service.metrics import UNKNOWN_MODEL, ServiceMetrics, drift_families
from bnfold.service.protocol import BACKEND, PLATFORM
from bnfold.service.registry import ModelRegistry, ModelState
from bnfold.service.runs import Runner
from bnfold.service.sessions import LoadedModel, batch_statistic_outputs
from bnfold.service.statistics import Execution
from bnfold.service.tracing import Tracing
from bnfold.service.warmup import triton_model_warmup

SERVER_NAME = "bnfold"
logger = logging.getLogger("bnfold.service")
EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
    "bnfold_compare",
    "bnfold_drift",
)


def server_version() -> str:
    try:
        return package_version("bnfold")
    except PackageNotFoundError:
        return "0+unknown"


def _version_number(version: str) -> int:
    number = parse_version(version)
    if number is None:
        raise NotFound(f"{version!r} is not a model version (a positive integer)")
    return number


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def check_inputs(
    model: LoadedModel, inputs: Mapping[str, np.ndarray], finite: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """The feeds, once every input matches the manifest by name, datatype and shape and
    holds finite numbers (else 422: NaN or infinity in, NaN out, or a JSON null). Inputs
    named in `finite` are known to hold finite numbers (the JSON decoder's)."""
    tensors = model.inputs
    if len(inputs) != len(tensors):
        _refuse_input_names(model, inputs)
    for tensor in tensors:  # loops, not comprehensions: this runs for every request
        if tensor.name not in inputs:
            _refuse_input_names(model, inputs)
    feeds: dict[str, np.ndarray] = {}
    batch_sizes = set()
    for tensor in tensors:
        array = feeds[tensor.name] = inputs[tensor.name]
        _check_tensor(tensor, array, tensor.name in finite)
        if tensor.shape and tensor.shape[0] == -1:
            batch_sizes.add(array.shape[0])
    if len(batch_sizes) > 1:
        raise Unprocessable(f"the inputs disagree on the batch size: {sorted(batch_sizes)}")
    return feeds


def _refuse_input_names(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> NoReturn:
    """422 for the first input the model does not take, else for the first one missing."""
    expected = [tensor.name for tensor in model.inputs]
    for name in inputs:
        if name not in expected:
            raise Unprocessable(f"unknown input {name!r}: {model.name} takes {', '.join(expected)}")
    for name in expected:
        if name not in inputs:
            raise Unprocessable(f"missing input {name!r}: {model.name} takes {', '.join(expected)}")
    raise Unprocessable(f"the inputs do not match {model.name}'s: it takes {', '.join(expected)}")


def _shape_fits(declared: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(declared) != len(shape):
        return False
    # a loop, not all() over a generator: this runs for every input of every request
    for want, got in zip(declared, shape):  # noqa: B905, SIM110 -- lengths checked above
        if want != got and want != -1:
            return False
    return True


def _check_tensor(tensor: ManifestTensor, array: np.ndarray, finite: bool) -> None:
    datatype = DATATYPE_OF_DTYPE[array.dtype]
    if datatype != tensor.datatype:
        raise Unprocessable(
            f"input {tensor.name!r} is {datatype} but the model expects {tensor.datatype}"
        )
    if not _shape_fits(tensor.shape, array.shape):
        raise Unprocessable(
            f"input {tensor.name!r} has shape {_shape_text(array.shape)} but the model expects "
            f"{_shape_text(tensor.shape)} (-1: any size)"
        )
    if not finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise Unprocessable(
            f"input {tensor.name!r} contains NaN or infinity: the service takes finite values only"
        )


def select_outputs(model: LoadedModel, requested: Sequence[str] | None) -> list[str]:
    """The outputs to return, in the order asked (None: every output, manifest order)."""
    names = [tensor.name for tensor in model.outputs]
    if requested is None:
        return names
    for name in requested:
        if name not in names:
            raise Unprocessable(f"unknown output {name!r}: {model.name} returns {', '.join(names)}")
    return list(requested)


def request_output_names(request: DecodedRequest) -> list[str] | None:
    """The output names a V2 request asks for (None: every output)."""
    return None if request.outputs is None else [output.name for output in request.outputs]


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


@dataclass(slots=True)
class Prediction:
    """`predict`'s answer: the version that ran, the outputs in the order asked, its rows, and
    what it cost (for the statistics): nanoseconds in `predict`, of which in the batcher's
    queue, and the run that served it.

    Read-only, though not frozen: a frozen dataclass is built field by field through
    `object.__setattr__`, 1.0 µs a request here against 0.25.
    """

    model: LoadedModel
    output_names: list[str]
    arrays: list[np.ndarray]
    rows: int
    predict_ns: int
    queue_ns: int
    execution: Execution


def _tensor_metadata(tensors: Sequence[ManifestTensor]) -> list[dict[str, Any]]:
    return [
        {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        for tensor in tensors
    ]


class DataPlane:
    """What the REST layer calls: every method takes names and decoded requests, not HTTP."""

    def __init__(
        self,
        registry: ModelRegistry,
        runner: Runner,
        batcher: Batcher,
        metrics: ServiceMetrics,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.registry = registry
        self.runner = runner
        self.batcher = batcher
        # without a monitor (started by the app's lifespan) nothing is sampled
        self.drift = drift or DriftMonitor(DriftConfig(enabled=False))
        # compare requests waiting or running, per model version: compare has no batcher
        # queue, so this is its bound (the model's max_queue_size)
        self._comparing: Counter[tuple[str, int]] = Counter()
        self.metrics = metrics
        # OpenTelemetry (tracing.py): None, tracing off, unless the app sets one
        self.tracing: Tracing | None = None
        self.ready = False
        # the drain window after SIGTERM (drain.py): not ready, still answering
        self.drain = DrainState()

    def model_label(self, name: str) -> str:
        """`name` if the repository has it; a bounded label for metrics otherwise."""
        return name if self.registry.knows(name) else UNKNOWN_MODEL

    def check_server_ready(self) -> None:
        """Readiness (/v2/health/ready, gRPC ServerReady): `check_ready`, and no drain window.

        In the window the server says not ready, so that balancers stop sending, and
        still serves: the requests and model readiness checks go by `check_ready`.
        """
        if self.drain.draining:
            raise Unavailable(
                "the server is draining for shutdown: not ready, still answering requests"
            )
        self.check_ready()

    def check_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the server is not ready (loading models or shutting down)")

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        model = self.registry.get(name, version)
        return {
            "name": model.name,
            "versions": [str(number) for number in self.registry.ready_versions(name)],
            "platform": PLATFORM,
            "inputs": _tensor_metadata(model.inputs),
            "outputs": _tensor_metadata(model.outputs),
            "parameters": {
                "version": str(model.version),
                "execution_providers": list(model.providers),
                "batchnorm_layers": [layer.name for layer in model.layers],
                "batching": model.batching.describe(),
            },
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration, as its `GET .../config` returns it: with the batching
        a load's config override set, and the warm-up runs made (`model_warmup`)."""
        model = self.registry.get(name, version)
        kind = "KIND_GPU" if model.providers[0] == "CUDAExecutionProvider" else "KIND_CPU"

        def tensors(specs: Sequence[ManifestTensor]) -> list[dict[str, Any]]:
            return [
                {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": list(spec.shape)}
                for spec in specs
            ]

        config: dict[str, Any] = {
            "name": model.name,
            "platform": PLATFORM,
            "backend": BACKEND,
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": 0,
            "input": tensors(model.inputs),
            "output": tensors(model.outputs),
            "instance_group": [{"name": model.name, "kind": kind, "count": 1}],
            "default_model_filename": "model.onnx",
            "parameters": {
                "execution_providers": {"string_value": ",".join(model.providers)},
            },
        }
        # Triton's block; max_batch_size stays 0 because the dims keep their -1 batch axis.
        dynamic_batching = model.batching.dynamic_batching()
        if dynamic_batching is not None:
            config["dynamic_batching"] = dynamic_batching
        warmup = triton_model_warmup(model.warmup, model.inputs)
        if warmup:
            config["model_warmup"] = warmup
        return config

    def package_report(self, name: str, version: str | None) -> dict[str, Any]:
        """GET .../package: the manifest this version was verified and loaded with, as the
        converter wrote it (fields without a value left out). Read at load, never again: a
        file changed on disk since then is not what is served, and is not shown."""
        model = self.registry.get(name, version)
        return {
            "model_name": model.name,
            "model_version": str(model.version),
            "manifest": model.manifest.model_dump(mode="json", exclude_none=True),
        }

    def input_names(self, name: str, version: str | None) -> list[str]:
        """The input names of the version a request for (`name`, `version`) hits."""
        return [tensor.name for tensor in self.registry.get(name, version).inputs]

    def model_ready(self, name: str, version: str | None) -> dict[str, Any]:
        """`{"name", "ready": true}`; raises NotFound (unknown) or Unavailable (not ready)."""
        self.check_ready()
        model = self.registry.get(name, version)
        return {"name": model.name, "ready": True}

    def repository_index(self, ready_only: bool) -> list[dict[str, Any]]:
        return [
            {
                "name": entry.name,
                "version": str(entry.version),
                "state": entry.state.value,
                "reason": entry.reason,
            }
            for entry in self.registry.index()
            if not ready_only or entry.state is ModelState.READY
        ]

    async def load(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        """(Re)load `name`; `config`: Triton's config JSON override (`parameters.config`)."""
        try:
            await asyncio.to_thread(self.registry.load, name, config)
        finally:
            self.batcher.retire(name)
            self.version_loaded(name)

    async def unload(self, name: str) -> None:
        await asyncio.to_thread(self.registry.unload, name)
        self.batcher.retire(name)
        self.version_loaded(name)

    async def load_version(self, name: str, version: str) -> None:
        """Load one version beside the others (a roll forward under the `latest` policy)."""
        await asyncio.to_thread(self.registry.load_version, name, _version_number(version))
        self.version_loaded(name)

    async def unload_version(self, name: str, version: str) -> None:
        """Stop serving one version (a rollback when it is the newest); requests holding it
        finish on it, its queue drains."""
        number = _version_number(version)
        self.registry.unload_version(name, number)
        self.batcher.retire_version(name, number)
        self.version_loaded(name)

    def version_loaded(self, name: str) -> None:
        """After versions of `name` were loaded or unloaded: forget what the drift monitor
        and the statistics kept of versions no longer served."""
        loaded = self._loaded_models()
        self.drift.keep_only(loaded)
        self.metrics.statistics.keep_only(loaded)
        self.prepare(loaded)

    def prepare(self, models: Sequence[LoadedModel] | None = None) -> None:
        """Build each version's batcher queue and its run threads before the first request,
        which would otherwise pay for them (0.3 to 1.1 ms measured on the MLP, whose request
        takes 0.5). The sessions' warm-up (warmup.py) makes the first run as fast as the
        next; this shortens the first request's way to it."""
        for model in self._loaded_models() if models is None else models:
            self.batcher.queue(model)

    def recent_inputs(self, name: str, version: int) -> dict[str, np.ndarray]:
        """The drift monitor's reservoir of live inputs of `name` version `version`."""
        return self.drift.recent_inputs(self.registry.get(name, str(version)))

    def _loaded_models(self) -> list[LoadedModel]:
        return [entry.model for entry in self.registry.index() if entry.model is not None]

    def drift_report(self, name: str, version: str | None, channels: bool) -> dict[str, Any]:
        """GET .../drift: the live traffic's drift from the version's running statistics
        (unversioned: the version an unversioned infer hits). 200 even when the version is
        not monitored (`available` false with the reason)."""
        return self.drift.report(self.registry.get(name, version), channels)

    def drift_metric_families(self) -> list[Metric]:
        """The drift series of every loaded version, for a /metrics scrape."""
        return drift_families(self.drift.metric_series(self._loaded_models()))

    def admit_infer(self, name: str, version: str | None) -> None:
        """Refuse an inference before its body is read when it cannot be served now: the
        server not ready, an unknown or unready model, a full queue (503 + Retry-After).

        Reading and decoding a body only to refuse it costs an overloaded server most of
        what serving it would. `infer` checks again: the queue may fill meanwhile.
        """
        self.check_ready()
        self.batcher.check_room(self.registry.get(name, version))

    def admit_compare(self, name: str, version: str | None) -> None:
        """`admit_infer` for compare, whose bound is the compares in progress."""
        self.check_ready()
        self._check_compare_room(self.registry.get(name, version))

    def _check_compare_room(self, model: LoadedModel) -> None:
        in_progress = self._comparing[model.name, model.version]
        if in_progress >= model.batching.max_queue_size:
            raise QueueFull(
                f"{model.name} version {model.version} has {in_progress} compare requests "
                "in progress (max_queue_size); retry later"
            )

    async def predict(
        self,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None,
        finite_inputs: Collection[str] = (),
    ) -> Prediction:
        """Run one inference request: the transport-neutral entry point (REST infer, gRPC
        ModelInfer). `inputs`: the decoded tensors by input name; `output_names`: the
        outputs to return, in that order (None: all, manifest order); `finite_inputs`: the
        inputs the decoder found finite (`DecodedRequest.finite`), not scanned again.

        Raises the service's errors: `Unavailable` (server or model not ready), `NotFound`,
        `Unprocessable` (tensors that do not fit the model, a run that fails), `QueueFull`.
        Call `admit_infer(name, version)` before decoding a body; `predict` checks again.

        Statistics (`model_statistics`): a failure inside `predict` once the model version
        is known, and a cancellation (`asyncio.CancelledError`: the client went away), are
        counted here. The transport then calls, on the event loop thread:
        - `record_success(prediction, decode_ns, encode_ns)` once the response is encoded,
          with the nanoseconds it spent reading the request's tensors into arrays and
          writing the response;
        - `record_failure(prediction, ns)` instead if encoding the answer failed.
        A body that cannot be decoded is refused before any model sees it: not counted.
        """
        self.check_ready()
        model = self.registry.get(name, version)
        started = time.perf_counter_ns()
        try:
            feeds = check_inputs(model, inputs, finite_inputs)
            selected = select_outputs(model, output_names)
            rows = _batch_size(feeds)
            self.metrics.batch_size.labels(model.name, "infer").observe(rows)
            self.drift.offer(model, feeds)
            arrays, queue_ns, execution = await self.batcher.run(model, feeds, selected)
        except BaseException:
            self.metrics.statistics.of(model).record_failure(time.perf_counter_ns() - started)
            raise
        logger.debug("infer %s version %d, batch %d", model.name, model.version, rows)
        predict_ns = time.perf_counter_ns() - started
        return Prediction(model, selected, arrays, rows, predict_ns, queue_ns, execution)

    def record_success(self, prediction: Prediction, decode_ns: int, encode_ns: int) -> None:
        """Count `prediction`'s request as answered (see `predict`)."""
        self.metrics.statistics.of(prediction.model).record_success(
            prediction.rows,
            prediction.predict_ns,
            prediction.queue_ns,
            prediction.execution,
            decode_ns,
            encode_ns,
        )

    def record_failure(self, prediction: Prediction, ns: int) -> None:
        """Count `prediction`'s request as failed after `predict` returned (see `predict`):
        `ns` from its decode to the failure."""
        self.metrics.statistics.of(prediction.model).record_failure(ns)

    def model_statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """Triton's statistics (`{"model_stats": [...]}`, the JSON of gRPC's
        ModelStatisticsResponse): of every loaded version of every model (`name` None), of
        every loaded version of `name` (`version` None), or of one version. `NotFound` for
        a model the repository does not have or a version it does not serve."""
        if name is None:
            models = self._loaded_models()
        elif version is None:
            self.registry.ready_versions(name)  # NotFound for an unknown model
            models = [model for model in self._loaded_models() if model.name == name]
        else:
            models = [self._served_version(name, version)]
        return {"model_stats": self.metrics.statistics.report(models)}

    def _served_version(self, name: str, version: str) -> LoadedModel:
        number = _version_number(version)
        if number not in self.registry.ready_versions(name):
            raise NotFound(f"model {name!r} version {version} is not loaded")
        return self.registry.get(name, str(number))

    async def compare(
        self,
        name: str,
        version: str | None,
        request: DecodedRequest,
        options: compare.CompareOptions,
    ) -> dict[str, Any]:
        """Run both graphs on one batch; never touches any state (the graphs are pure).

        `options` (from the query string) add to what the body's own fields ask for.
        """
        self.check_ready()
        options = options | compare.CompareOptions.from_fields(request.fields)
        model = self.registry.get(name, version)
        feeds = check_inputs(model, request.inputs)
        output_names = select_outputs(model, request_output_names(request))
        batch_size = _batch_size(feeds)
        compare.check_batch_has_statistics(model.layers, batch_size)
        statistic_names = batch_statistic_outputs(model.manifest)
        self.metrics.batch_size.labels(model.name, "compare").observe(batch_size)
        self._check_compare_room(model)
        key = (model.name, model.version)
        self._comparing[key] += 1
        try:
            train_session = await model.train.session_async()
            eval_arrays, train_arrays = await asyncio.gather(
                self.runner.run(model, model.eval_session, feeds, output_names),
                self.runner.run(model, train_session, feeds, [*output_names, *statistic_names]),
            )
        finally:
            self._comparing[key] -= 1
            if not self._comparing[key]:
                del self._comparing[key]
        logger.debug("compare %s version %d, batch %d", model.name, model.version, batch_size)
        train_outputs = train_arrays[: len(output_names)]
        outputs, drift = compare.compare_report(
            output_names,
            eval_arrays,
            train_outputs,
            model.layers,
            train_arrays[len(output_names) :],
            batch_size,
            options.channels,
        )
        report: dict[str, Any] = {
            "model_name": model.name,
            "model_version": str(model.version),
            "batch_size": batch_size,
            "outputs": outputs,
            "batchnorm": drift,
        }
        if request.id is not None:
            report["id"] = request.id
        if options.return_outputs:
            report["eval_outputs"] = [
                tensor_json(name, array)
                for name, array in zip(output_names, eval_arrays, strict=True)
            ]
            report["train_outputs"] = [
                tensor_json(name, array)
                for name, array in zip(output_names, train_outputs, strict=True)
            ]
        return report
