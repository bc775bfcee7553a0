"""Triton's statistics extension: what each loaded model version's requests and runs cost.

    GET /v2/models[/{name}[/versions/{version}]]/stats, gRPC ModelStatistics

The fields and what they count are Triton's (grpc_service.proto
`ModelStatistics`, core `InferenceStatsAggregator`), so tritonclient and
dashboards built for Triton read them unchanged:

- `inference_count`: rows (axis 0) of the successful requests: one request of
  64 rows counts 64. `execution_count`: onnxruntime runs of model.onnx; a
  merged batch is one run, a failed run none.
- `last_inference`: wall-clock milliseconds since the epoch of the last run.
- `inference_stats`, per successful request (each {count, ns}, count the
  number of requests): `success` the whole request, `queue` from entering
  the batcher's queue to its run starting, `compute_input` reading the
  request's tensors into arrays (the transport's decode) and merging them into
  the run's batch, `compute_infer` the run (a merged run's whole time, charged
  to each of its requests, as Triton does), `compute_output` splitting the
  run's outputs and encoding the response. `fail`: requests that failed once
  their model version was known (tensors that do not fit the model, a full
  queue, a run that failed, a client that went away); a body that cannot be
  read is refused before any model sees it and is not counted, as in Triton.
  `cache_hit` / `cache_miss` stay zero: bnfold has no response cache.
- `batch_stats`, per executed batch size (rows of the run): runs and their
  merge / run / split time.

Cost: a request adds a few integers to its version's counters and a run one
dict lookup. Every update happens on the event loop thread (the data plane and
the batcher's completion callbacks), never with a lock; a report is read on
the same thread, so it never sees half an update.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bnfold.service.sessions import LoadedModel


@dataclass(slots=True)
class Execution:
    """One run of model.onnx by the batcher: its rows and the three phases' nanoseconds.

    Read-only, though not frozen (as `dataplane.Prediction`: half the cost to build)."""

    rows: int
    input_ns: int  # the requests' feeds merged into the run's (concatenated)
    infer_ns: int  # session.run
    output_ns: int  # the run's outputs split back per request
    # a run thread's CPU in session.run: the run without the wait for the GIL after it (up
    # to 30 µs while the event loop holds it), for the batcher's estimate; 0 inline
    infer_cpu_ns: int = 0


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class VersionStatistics:
    """The counters of one loaded model version; event loop only."""

    __slots__ = (
        "batches",
        "execution_count",
        "fail_count",
        "fail_ns",
        "infer_ns",
        "inference_count",
        "input_ns",
        "last_inference_ms",
        "model",
        "output_ns",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.input_ns = 0
        self.infer_ns = 0
        self.output_ns = 0
        # rows of a run -> [runs, merge ns, run ns, split ns]
        self.batches: dict[int, list[int]] = {}

    def record_success(
        self,
        rows: int,
        predict_ns: int,
        queue_ns: int,
        execution: Execution,
        decode_ns: int,
        encode_ns: int,
    ) -> None:
        """A request of `rows` rows answered: `predict_ns` in the data plane, of which
        `queue_ns` in the queue and `execution` its run; the transport took `decode_ns` to
        read its tensors and `encode_ns` to write the response."""
        self.inference_count += rows
        self.success_count += 1
        self.success_ns += decode_ns + predict_ns + encode_ns
        self.queue_ns += queue_ns
        self.input_ns += decode_ns + execution.input_ns
        self.infer_ns += execution.infer_ns
        self.output_ns += execution.output_ns + encode_ns

    def record_failure(self, ns: int) -> None:
        self.fail_count += 1
        self.fail_ns += ns

    def record_execution(self, execution: Execution) -> None:
        """A run of model.onnx succeeded (whether or not its callers are still waiting)."""
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        batch = self.batches.get(execution.rows)
        if batch is None:
            batch = self.batches[execution.rows] = [0, 0, 0, 0]
        batch[0] += 1
        batch[1] += execution.input_ns
        batch[2] += execution.infer_ns
        batch[3] += execution.output_ns

    def report(self) -> dict[str, Any]:
        """Triton's `ModelStatistics` as JSON (the field names of grpc_service.proto)."""
        successes = self.success_count
        return {
            "name": self.model.name,
            "version": str(self.model.version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(successes, self.success_ns),
                "fail": _duration(self.fail_count, self.fail_ns),
                "queue": _duration(successes, self.queue_ns),
                "compute_input": _duration(successes, self.input_ns),
                "compute_infer": _duration(successes, self.infer_ns),
                "compute_output": _duration(successes, self.output_ns),
                "cache_hit": _duration(0, 0),
                "cache_miss": _duration(0, 0),
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": _duration(runs, input_ns),
                    "compute_infer": _duration(runs, infer_ns),
                    "compute_output": _duration(runs, output_ns),
                }
                for rows, (runs, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
            ],
        }


class InferenceStatistics:
    """Every loaded model version's counters, created on first use; owned by the app.

    Keyed by the loaded model itself: a reload starts from zero, as in Triton,
    and versions that stay loaded keep theirs whatever happens to the others.
    """

    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], VersionStatistics] = {}

    def of(self, model: LoadedModel) -> VersionStatistics:
        key = (model.name, model.version)
        found = self._versions.get(key)
        if found is None or found.model is not model:
            found = self._versions[key] = VersionStatistics(model)
        return found

    def keep_only(self, models: Iterable[LoadedModel]) -> None:
        """Forget the versions no longer loaded (and let go of their sessions)."""
        loaded = {id(model) for model in models}
        self._versions = {
            key: found for key, found in self._versions.items() if id(found.model) in loaded
        }

    def report(self, models: Iterable[LoadedModel]) -> list[dict[str, Any]]:
        """`model_stats` for `models` (zeros for a version that has served nothing yet)."""
        return [self.of(model).report() for model in models]
