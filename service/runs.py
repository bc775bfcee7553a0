"""Running a session off the event loop, and what an onnxruntime failure means to a client.

onnxruntime releases the GIL inside `run`, so runs on other threads overlap
each other and the event loop. `ExecutorRunner` is the plain path (one request,
one run on an executor thread), used by compare; inference goes through the
batcher (`batching`) and its run threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from bnfold.service.errors import Unprocessable
from bnfold.service.metrics import ServiceMetrics
from bnfold.service.sessions import LoadedModel

# What `InferenceSession.run` raises on inputs that matched the manifest but not the graph.
RUN_ERRORS = (InvalidArgument, Fail, RuntimeException)


def run_failed(model_name: str, exc: Exception) -> Unprocessable:
    """The inputs matched the manifest; what remains is input-dependent (a dynamic axis
    the graph cannot take): the request's problem, not the server's."""
    return Unprocessable(f"onnxruntime could not run {model_name} on this input: {exc}")


class Runner(Protocol):
    async def run(
        self,
        model: LoadedModel,
        session: ort.InferenceSession,
        feeds: dict[str, np.ndarray],
        output_names: Sequence[str],
    ) -> list[np.ndarray]: ...


def run_executor(concurrent_runs: int) -> ThreadPoolExecutor:
    """The threads of `ExecutorRunner`: `concurrent_runs` of them (`Settings.concurrent_runs`),
    named like the batcher's run threads (`bnfold-run-...`)."""
    return ThreadPoolExecutor(concurrent_runs, thread_name_prefix="bnfold-run-compare")


class ExecutorRunner:
    """One session run per executor task; records queue and compute time."""

    def __init__(self, executor: Executor, metrics: ServiceMetrics) -> None:
        self._executor = executor
        self._metrics = metrics

    async def run(
        self,
        model: LoadedModel,
        session: ort.InferenceSession,
        feeds: dict[str, np.ndarray],
        output_names: Sequence[str],
    ) -> list[np.ndarray]:
        submitted = time.perf_counter()

        def job() -> tuple[float, float, list[np.ndarray]]:
            started = time.perf_counter()
            outputs = session.run(list(output_names), feeds)
            return started, time.perf_counter(), outputs

        try:
            started, finished, outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, job
            )
        except RUN_ERRORS as exc:
            raise run_failed(model.name, exc) from None
        graph = "eval" if session is model.eval_session else "train"
        self._metrics.queue.labels(model.name).observe(started - submitted)
        self._metrics.compute.labels(model.name, graph).observe(finished - started)
        return outputs
