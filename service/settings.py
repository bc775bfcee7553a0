"""Every setting of the service, in one pydantic-settings class.

Each field is read from a `BNFOLD_`-prefixed environment variable
(`BNFOLD_PORT=9000`) and is also a `bnfold serve` option (`--port 9000`); an
option given on the command line wins over the environment. The options are
generated from the fields (serve_cli.py): a field's description is its help,
its default the documented default, so a new setting is one field here.

A renamed setting keeps its former name (`RENAMED`) as a deprecated alias: the
environment variable, the option and the keyword argument still work and log
a warning saying what to use instead.

This module imports nothing else of the service, nor `bnfold.models` (numpy
and the model registry, which serving does not need): the service imports it,
and builds what it configures from it (`SessionConfig.from_settings`,
`BatchPolicy.from_settings`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

logger = logging.getLogger("bnfold.service")

MIB = 1 << 20
ENV_PREFIX = "BNFOLD_"
# Former field name -> current one; each former name is still read, with a warning.
RENAMED: Final[Mapping[str, str]] = MappingProxyType({"executor_workers": "concurrent_runs"})


def _embedded_repository() -> Path:
    """`bnfold.models.DEFAULT_REPOSITORY`, found without running `bnfold.models`."""
    spec = importlib.util.find_spec("bnfold.models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("bnfold.models is missing from this installation")
    return Path(next(iter(spec.submodule_search_locations))) / "repository"


DEFAULT_REPOSITORY: Final = _embedded_repository()


class Device(str, Enum):
    """Where sessions run. `auto` takes CUDA when onnxruntime-gpu and a GPU are present."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class VersionPolicy(str, Enum):
    """Which version an unversioned request hits (registry.py says how)."""

    LATEST = "latest"
    SPECIFIC = "specific"


class ExecutionMode(str, Enum):
    """onnxruntime's execution mode: nodes one after another, or independent branches at once."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


class LogLevel(str, Enum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class OptionNames:
    """A setting's `bnfold serve` option names, when the field name in kebab case is not
    them: `Annotated[int, OptionNames("--threads", "--intra-op-threads")]`."""

    __slots__ = ("names",)

    def __init__(self, *names: str) -> None:
        self.names = names


def environment_variable(field: str) -> str:
    """The environment variable of a `Settings` field (or of a former name in `RENAMED`)."""
    return f"{ENV_PREFIX}{field.upper()}"


def _cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup (a container's CPU limit), if there is one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (in a container
    the affinity lists every core of the node, the quota is the pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus or 1, max(1, math.ceil(limit)))
    return max(1, cpus or 1)


def _warn_deprecated(former: str, outcome: str) -> None:
    logger.warning("%s is deprecated, %s", former, outcome)


class _FormerEnvironmentNames(PydanticBaseSettingsSource):
    """`BNFOLD_EXECUTOR_WORKERS` and the other former names of `RENAMED`, ranked below
    the current names (`BNFOLD_CONCURRENT_RUNS` or a keyword argument wins)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for former, current in RENAMED.items():
            value = os.environ.get(environment_variable(former))
            if value is None:
                continue
            variable = environment_variable(current)
            if variable in os.environ:
                _warn_deprecated(environment_variable(former), f"ignored: {variable} is set")
            elif current in self.current_state:
                _warn_deprecated(environment_variable(former), f"ignored: {current} is given")
            else:
                _warn_deprecated(environment_variable(former), f"use {variable}")
                values[current] = value
        return values


class Settings(BaseSettings):
    """Configuration of one `bnfold serve` process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    repository: Annotated[Path, OptionNames("--repository", "-r")] = Field(
        DEFAULT_REPOSITORY,
        description="Model repository to serve (REPO/NAME/VERSION packages); the default, "
        "the embedded repository of built-in digits models, is built on first use.",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    device: Device = Field(
        Device.AUTO,
        description="auto: CUDA when onnxruntime-gpu sees a GPU, else CPU; cuda: fail at "
        "start when it cannot.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="uvicorn worker processes; each loads every model, so memory grows with it.",
    )
    intra_op_threads: Annotated[int, OptionNames("--threads", "--intra-op-threads")] = Field(
        0,
        ge=0,
        le=256,
        description="onnxruntime threads per session run; 0: the CPUs / concurrent runs "
        "(both 0: one run on every CPU).",
    )
    concurrent_runs: int = Field(
        0,
        ge=0,
        le=256,
        description="Session runs at once per process, shared by every model; 0: the CPUs "
        "/ threads.",
    )
    inter_op_threads: int = Field(
        1, ge=1, le=256, description="onnxruntime inter-op threads, parallel mode only."
    )
    execution_mode: ExecutionMode = Field(
        ExecutionMode.SEQUENTIAL,
        description="onnxruntime execution mode: sequential, or independent branches in parallel.",
    )
    memory_arena: bool = Field(True, description="onnxruntime's CPU memory arena.")
    allow_spinning: Annotated[bool, OptionNames("--spinning/--no-spinning")] = Field(
        False,
        description="onnxruntime's threads busy-wait between a run's parallel sections "
        "(they sleep once the last run ends); burns cores the event loop needs.",
    )
    # The batching defaults (BatchPolicy's too) measured best: batch_policy.py says why.
    max_batch_size: int = Field(
        32,
        ge=0,
        description="Dynamic batching: rows per merged run, 0 or 1 turns it off; a package "
        "or REPO/NAME/config.json overrides it.",
    )
    max_queue_delay_us: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Dynamic batching: longest wait (µs) of a request for others; 0 merges "
        "what queued while the runs were busy.",
    )
    max_queue_size: int = Field(
        256, ge=1, description="Requests queued per model version before 503 + Retry-After."
    )
    max_body_bytes: int = Field(64 * MIB, ge=1, description="Largest request body, 413 above.")
    max_decode_bytes: int = Field(
        0,
        ge=0,
        description="Estimated memory reading and decoding the requests in flight may take: "
        "413 for one request above it, 503 + Retry-After while others hold it; 0: "
        "(concurrent runs + 8) x max body bytes, a binary body per run plus one body of "
        "JSON floats (estimated at ~7.4x its size).",
    )
    # 64 KiB: above Envoy's 60 KiB, the proxy in front of KServe, so nothing it passes is
    # refused; at 1 MiB (the cap) a head still parses in milliseconds.
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=MIB,
        description="Largest request line plus header fields, 431 above; at most 1 MiB.",
    )
    max_header_count: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most header fields in a request (Envoy's limit), 431 above.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token enabling load/unload; unset disables them. Prefer the "
        "environment variable: command lines are visible to other users.",
    )
    console: bool = Field(
        True, description="The web console at /ui (static files; uses the public API only)."
    )
    # gRPC (service/grpc/): the KServe V2 GRPCInferenceService beside REST, as Triton.
    grpc: Annotated[bool, OptionNames("--grpc/--no-grpc")] = Field(
        True, description="Serve the KServe V2 gRPC protocol on --grpc-port too."
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the gRPC server (Triton's); 0 picks one."
    )
    warmup: Annotated[bool, OptionNames("--warmup/--no-warmup")] = Field(
        True,
        description="Run warm-up batches (zeros, at the batch sizes the batcher will use) on "
        "each version before it reports READY, as Triton's model warmup does.",
    )
    resident_train_graph: Annotated[
        bool, OptionNames("--resident-train-graph/--on-demand-train-graph")
    ] = Field(
        False,
        description="Keep each version's train.onnx session open from load on. Default: it "
        "is opened, checked and warmed at load, then closed; the first compare reopens it "
        "from the package, hash-checked again (0.14 s for a ResNet-18 here), and keeps it.",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry: export spans of infer/compare (request, queue, run, encode) "
        "over OTLP/HTTP to this URL (e.g. http://collector:4318/v1/traces); unset: tracing "
        "off, at no cost.",
    )
    log_level: LogLevel = Field(
        LogLevel.INFO, description="debug also logs successful probes and each model run."
    )
    log_format: LogFormat = Field(
        LogFormat.TEXT,
        description="text: one readable line per record; json: one JSON object per line "
        "(for log shippers), with the request id as a field.",
    )
    access_log: Annotated[bool, OptionNames("--access-log/--no-access-log")] = Field(
        True,
        description="One line per request: method, path, model, version, status, bytes in "
        "and out, latency, request id (written off the event loop).",
    )
    shutdown_grace_seconds: Annotated[float, OptionNames("--shutdown-grace")] = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish on shutdown."
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="On SIGTERM, seconds the server keeps accepting and answering while "
        "/v2/health/ready says 503 (responses carry Connection: close), before it stops "
        "listening and gives the requests in flight the shutdown grace; SIGINT (Ctrl-C) "
        "skips it; 0: stop listening at once.",
    )
    # Slow and idle clients (http_protocol.py): what a reverse proxy would otherwise bound.
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A request line and header fields must arrive within this many seconds "
        "of their first byte (or of the connection opening): 408 and close after it.",
    )
    body_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="A request body must arrive within this many seconds of its head: 408 "
        "and close after it (64 MiB in 60 s needs about 1.1 MB/s; raise it for slow links).",
    )
    keep_alive_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="An idle keep-alive connection is closed after this many seconds "
        "(keep it above a load balancer's idle timeout in front).",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Open HTTP connections per process; a request on one past it gets 503 + "
        "Retry-After and the connection closes.",
    )
    # Drift monitoring (drift_monitor.py); the default fraction measured within the cost
    # target of the serving benchmark (BENCHMARKS.md).
    drift_monitoring: bool = Field(
        True,
        description="Measure each BatchNorm's input on a sample of the inference requests "
        "(packages with calibration.onnx) and report its drift from the running statistics "
        "at GET .../drift and on /metrics.",
    )
    drift_sample_fraction: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Drift monitoring: fraction of each model version's inference requests "
        "measured (every 1/fraction-th one; 1: all).",
    )
    drift_cpu_budget: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Drift monitoring: the most CPU its measurements may take, as a fraction "
        "of one core over time (after a burst of 0.02 s); a sample past it is skipped and "
        "counted as dropped. Bounds what a heavy model's sampling costs serving's tail "
        "(BENCHMARKS.md); 0: no bound.",
    )
    drift_window_seconds: float = Field(
        300.0,
        ge=1,
        description="Drift monitoring: the sliding window, in seconds, the statistics are "
        "pooled over (kept in 10 time buckets: memory does not grow with traffic).",
    )
    drift_kl_threshold: float = Field(
        0.1,
        gt=0,
        description="Drift monitoring: a layer has drifted when the mean over its channels "
        "of KL(live || running) exceeds this, in nats (0.1: a mean shift of 0.45 running "
        "stds, or a variance ratio of 1.6 or 0.6, alone).",
    )
    drift_metrics_layers: int = Field(
        16,
        ge=0,
        le=1024,
        description="Drift monitoring: per model version, the worst layers with KL and mean "
        "shift gauges on /metrics (bounds the series).",
    )
    drift_reservoir_samples: int = Field(
        0,
        ge=0,
        description="Most recent sampled input rows kept in memory per model version for "
        "a recalibration from live traffic; 0: off (they are request data).",
    )
    drift_reservoir_bytes: int = Field(
        128 * MIB,
        ge=1,
        description="Largest size of each model version's reservoir of input rows.",
    )
    # Versions and recalibration (registry.py, recalibration.py).
    version_policy: VersionPolicy = Field(
        VersionPolicy.LATEST,
        description="Which version unversioned requests hit: latest (the highest ready one: a "
        "recalibrated version rolls forward once loaded) or specific (REPO/NAME/config.json's "
        "default_version, else the highest ready when the model was loaded).",
    )
    recalibration_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="onnxruntime threads of a recalibration (POST .../recalibrate): it shares "
        "the CPUs with serving.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        former_names = _FormerEnvironmentNames(settings_cls)
        return init_settings, env_settings, former_names, dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _former_keyword_names(cls, values: Any) -> Any:
        """`Settings(executor_workers=2)`: a former name among the keyword arguments
        (environment variables under former names are `_FormerEnvironmentNames`')."""
        if not isinstance(values, dict) or not RENAMED.keys() & values.keys():
            return values
        values = dict(values)
        for former, current in RENAMED.items():
            if former in values:
                _warn_deprecated(former, f"use {current}")
                values[current] = values.pop(former)
        return values

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        """`BNFOLD_ADMIN_TOKEN=` (empty) means no token, not an empty password."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @property
    def session_threads(self) -> int:
        """Intra-op threads per run. Both 0 (the default): one run on every CPU, which measured
        best (BENCHMARKS.md): at one client a run takes half the time it takes on one
        thread, and under load the batcher fills that run with the queued rows."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, available_cpus() // (self.concurrent_runs or 1))

    @property
    def resolved_concurrent_runs(self) -> int:
        """`concurrent_runs`, or as many runs as fill the CPUs, each with its own threads."""
        if self.concurrent_runs:
            return self.concurrent_runs
        return max(1, available_cpus() // self.session_threads)

    @property
    def decode_budget(self) -> int:
        """`max_decode_bytes`, or room for a largest binary body per concurrent run (it costs
        its size: the arrays are views of it) beside one largest body of full-precision JSON
        floats, estimated at 7.4x its size (bodies.py), rounded up to 8x. The shipped
        defaults (64 MiB bodies, 2 CPUs: one run on both) give 9 x 64 MiB = 576 MiB."""
        return self.max_decode_bytes or (self.resolved_concurrent_runs + 8) * self.max_body_bytes


def settings_environment(settings: Settings) -> dict[str, str]:
    """`settings` as the `BNFOLD_*` variables that rebuild it in another process (the
    `--workers` processes); secrets in clear, unset settings left out."""
    environment = {}
    for field, value in settings.model_dump(mode="json").items():
        secret = getattr(settings, field)
        if isinstance(secret, SecretStr):
            value = secret.get_secret_value()
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            environment[environment_variable(field)] = text
    return environment
