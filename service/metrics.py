"""Prometheus metrics, in a registry owned by the app (two apps in one process never mix).

Model labels only ever hold names of models in the repository: a request for an
unknown name is counted under `_unknown`, so clients cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from bnfold.service.errors import as_service_error

UNKNOWN_MODEL = "_unknown"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bnfold_requests",
            "Inference and compare requests by model, endpoint and outcome.",
            ["model", "endpoint", "outcome", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bnfold_request_duration_seconds",
            "Whole request: reading the body to the encoded response.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "bnfold_queue_duration_seconds",
            "Time from a request entering its model's queue (or the executor, for compare) "
            "to the start of the session run that serves it.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "bnfold_compute_duration_seconds",
            "onnxruntime session run time, by graph (eval: model.onnx, train: train.onnx).",
            ["model", "graph"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "bnfold_requests_in_flight",
            "Inference and compare requests being processed.",
            ["endpoint"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bnfold_batch_size",
            "Batch size (axis 0 of the inputs) of the requests that ran.",
            ["model", "endpoint"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.run_batch_size = Histogram(
            "bnfold_run_batch_size",
            "Rows per onnxruntime run of model.onnx, after the batcher merged requests.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.run_requests = Histogram(
            "bnfold_run_requests",
            "Requests merged into one onnxruntime run of model.onnx (1: ran alone).",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

    @contextmanager
    def track(self, model: str, endpoint: str) -> Iterator[None]:
        """Count one request with its outcome (from the error it raised, if any) and latency."""
        started = time.perf_counter()
        gauge = self.in_flight.labels(endpoint)
        gauge.inc()
        code = 200
        try:
            yield
        except Exception as exc:
            code = as_service_error(exc).status_code
            raise
        finally:
            gauge.dec()
            outcome = "ok" if code < 400 else "client_error" if code < 500 else "server_error"
            self.requests.labels(model, endpoint, outcome, str(code)).inc()
            self.latency.labels(model, endpoint).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
