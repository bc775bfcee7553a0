"""Prometheus metrics, in a registry owned by the app (two apps in one process never mix).

Model labels only ever hold names of models in the repository: a request for an
unknown name is counted under `_unknown`, so clients cannot grow the label set.

Why not prometheus_client's Counter, Gauge and Histogram: each update takes a
lock, builds a label key and (histograms) scans the buckets in Python. A small
model's request updates seven series; measured, that was a fifth of the
throughput for the digits MLP (BENCHMARKS.md). Every update here happens on
the event loop thread (route handlers, the batcher's completion callbacks), so
a series is a few plain numbers, the bucket found by `bisect`; the registry's
collector turns them into prometheus_client's metric families when /metrics is
scraped, on the same thread. Never update a series from another thread.

Drift (`drift_families`) is not counted per request at all: its gauges are
computed when /metrics is scraped, from the drift monitor's windows (a
source added with `ServiceMetrics.add_source`), for at most
`drift_metrics_layers` layers per model version, the worst ones, so the
series stay bounded whatever the models.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bnfold.service.errors import as_service_error
from bnfold.service.statistics import InferenceStatistics

UNKNOWN_MODEL = "_unknown"
# nginx's "client closed request": the client went away before its answer (no response is sent)
CLIENT_CLOSED_REQUEST = 499
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


class CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeSeries(CounterSeries):
    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramSeries:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


SeriesT = TypeVar("SeriesT", bound=CounterSeries | HistogramSeries)
ValueSeriesT = TypeVar("ValueSeriesT", bound=CounterSeries)


class _Metric(ABC, Generic[SeriesT]):
    """One metric: its series by label values, each made by `new_series` on first use."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], SeriesT] = {}

    def labels(self, *values: str) -> SeriesT:
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = self.new_series()
        return found

    @abstractmethod
    def new_series(self) -> SeriesT: ...

    @abstractmethod
    def family(self) -> Metric:
        """The series as prometheus_client's metric family, for a scrape."""


class _ValueMetric(_Metric[ValueSeriesT]):
    """A counter or a gauge: one number per series."""

    family_type: ClassVar[type[CounterMetricFamily] | type[GaugeMetricFamily]]

    def family(self) -> Metric:
        family = self.family_type(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.series.items():
            family.add_metric(values, series.value)
        return family


class Counter(_ValueMetric[CounterSeries]):
    family_type = CounterMetricFamily

    def new_series(self) -> CounterSeries:
        return CounterSeries()


class Gauge(_ValueMetric[GaugeSeries]):
    family_type = GaugeMetricFamily

    def new_series(self) -> GaugeSeries:
        return GaugeSeries()


class Histogram(_Metric[HistogramSeries]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(bound) for bound in buckets)
        self.le = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]

    def new_series(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.series.items():
            cumulative = 0
            buckets = []
            for le, count in zip(self.le, series.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, series.total)
        return family


MetricSource = Callable[[], Iterable[Metric]]


class _Families(Collector):
    def __init__(self, metrics: Sequence[_Metric[Any]]) -> None:
        self.metrics = metrics
        self.sources: list[MetricSource] = []

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()
        for source in self.sources:
            yield from source()


@dataclass(frozen=True)
class DriftLayerSeries:
    """One layer's drift gauges: mean over channels of the KL and of the mean shift."""

    layer: str
    kl_divergence: float
    mean_shift: float


@dataclass(frozen=True)
class DriftSeries:
    """One model version's drift series; `layers` already cut to the worst few."""

    model: str
    version: str
    samples: int
    drifted_layers: int
    dropped: int
    layers: tuple[DriftLayerSeries, ...]


def drift_families(series: Iterable[DriftSeries]) -> list[Metric]:
    """The drift monitor's metric families for one scrape."""
    version_labels = ["model", "version"]
    layer_labels = [*version_labels, "layer"]
    samples = GaugeMetricFamily(
        "bnfold_drift_window_samples",
        "Sampled input rows in the drift window, per model version.",
        labels=version_labels,
    )
    drifted = GaugeMetricFamily(
        "bnfold_drift_drifted_layers",
        "BatchNorm layers whose mean KL exceeds drift_kl_threshold in the window.",
        labels=version_labels,
    )
    dropped = CounterMetricFamily(
        "bnfold_drift_dropped_samples",
        "Sampled requests not measured: the monitor's queue was full or the run failed.",
        labels=version_labels,
    )
    kl = GaugeMetricFamily(
        "bnfold_drift_kl_divergence",
        "Mean over channels of KL(live || running) of a BatchNorm's input over the window, "
        "in nats; the drift_metrics_layers worst layers per model version.",
        labels=layer_labels,
    )
    shift = GaugeMetricFamily(
        "bnfold_drift_mean_shift",
        "Mean over channels of |live mean - running mean| / running std of a BatchNorm's "
        "input over the window; the same layers as bnfold_drift_kl_divergence.",
        labels=layer_labels,
    )
    for version in series:
        labels = [version.model, version.version]
        samples.add_metric(labels, version.samples)
        drifted.add_metric(labels, version.drifted_layers)
        dropped.add_metric(labels, version.dropped)
        for layer in version.layers:
            kl.add_metric([*labels, layer.layer], layer.kl_divergence)
            shift.add_metric([*labels, layer.layer], layer.mean_shift)
    return [samples, drifted, dropped, kl, shift]


class TrackedRequest:
    """`ServiceMetrics.track`'s block. A class, not a generator-based context manager:
    every request enters one, and contextlib's machinery cost more than the counting."""

    __slots__ = ("_endpoint", "_gauge", "_metrics", "_model", "_started")

    def __init__(self, metrics: ServiceMetrics, model: str, endpoint: str) -> None:
        self._metrics, self._model, self._endpoint = metrics, model, endpoint

    def __enter__(self) -> None:
        self._started = time.perf_counter()
        self._gauge = self._metrics.in_flight.labels(self._endpoint)
        self._gauge.inc()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        self._gauge.dec()
        if exc is None:
            requests, latency = self._metrics.answered(self._model, self._endpoint)
            requests.inc()
            latency.observe(time.perf_counter() - self._started)
            return
        if isinstance(exc, asyncio.CancelledError):
            code = CLIENT_CLOSED_REQUEST
        elif isinstance(exc, Exception):
            code = as_service_error(exc).status_code
        else:
            return  # KeyboardInterrupt, SystemExit: not a request's outcome
        outcome = "ok" if code < 400 else "client_error" if code < 500 else "server_error"
        metrics, model, endpoint = self._metrics, self._model, self._endpoint
        metrics.requests.labels(model, endpoint, outcome, str(code)).inc()
        metrics.latency.labels(model, endpoint).observe(time.perf_counter() - self._started)


class ServiceMetrics:
    def __init__(self) -> None:
        self._answered: dict[tuple[str, str], tuple[CounterSeries, HistogramSeries]] = {}
        self.requests = Counter(
            "bnfold_requests",
            "Inference and compare requests by model, endpoint and outcome.",
            ["model", "endpoint", "outcome", "code"],
        )
        self.latency = Histogram(
            "bnfold_request_duration_seconds",
            "Whole request: reading the body to the encoded response.",
            ["model", "endpoint"],
            _LATENCY_BUCKETS,
        )
        self.queue = Histogram(
            "bnfold_queue_duration_seconds",
            "Time from a request entering its model's queue (or the executor, for compare) "
            "to the start of the session run that serves it.",
            ["model"],
            _LATENCY_BUCKETS,
        )
        self.compute = Histogram(
            "bnfold_compute_duration_seconds",
            "onnxruntime session run time, by graph (eval: model.onnx, train: train.onnx).",
            ["model", "graph"],
            _LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "bnfold_requests_in_flight",
            "Inference and compare requests being processed.",
            ["endpoint"],
        )
        self.batch_size = Histogram(
            "bnfold_batch_size",
            "Batch size (axis 0 of the inputs) of the requests that ran.",
            ["model", "endpoint"],
            _BATCH_BUCKETS,
        )
        self.run_batch_size = Histogram(
            "bnfold_run_batch_size",
            "Rows per onnxruntime run of model.onnx, after the batcher merged requests.",
            ["model"],
            _BATCH_BUCKETS,
        )
        self.run_requests = Histogram(
            "bnfold_run_requests",
            "Requests merged into one onnxruntime run of model.onnx (1: ran alone).",
            ["model"],
            _BATCH_BUCKETS,
        )
        self.inline_runs = Counter(
            "bnfold_inline_runs",
            "Runs of model.onnx made on the event loop, not a run thread: a tiny model's run "
            "costs less than the hand-off (service/batching.py). Also in bnfold_run_batch_size.",
            ["model"],
        )
        self.cancelled = Counter(
            "bnfold_requests_cancelled",
            "Inference requests whose client went away (HTTP disconnect, gRPC cancel) while "
            "queued (dropped, never run) or running (the run finished, the answer dropped).",
            ["model", "stage"],
        )
        # Triton's statistics extension (GET .../stats), counted on the same thread
        self.statistics = InferenceStatistics()
        metrics = [value for value in vars(self).values() if isinstance(value, _Metric)]
        self.registry = CollectorRegistry()
        self._families = _Families(metrics)
        self.registry.register(self._families)

    def add_source(self, source: MetricSource) -> None:
        """Also render what `source()` returns at every scrape (on the event loop)."""
        self._families.sources.append(source)

    def remove_source(self, source: MetricSource) -> None:
        self._families.sources.remove(source)

    def answered(self, model: str, endpoint: str) -> tuple[CounterSeries, HistogramSeries]:
        """The series a 200 of `model`'s `endpoint` counts in: looked up once per pair."""
        key = (model, endpoint)
        found = self._answered.get(key)
        if found is None:
            found = self._answered[key] = (
                self.requests.labels(model, endpoint, "ok", "200"),
                self.latency.labels(model, endpoint),
            )
        return found

    def track(self, model: str, endpoint: str) -> TrackedRequest:
        """Count one request with its outcome (from the error it raised, if any) and latency;
        a cancelled one (its client went away, or the shutdown grace ended) as 499:
        `with metrics.track(model, endpoint):`."""
        return TrackedRequest(self, model, endpoint)

    def render(self) -> bytes:
        return generate_latest(self.registry)
