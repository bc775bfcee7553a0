"""Every setting of the service, in one pydantic-settings class.

Each field is read from a `BNFOLD_`-prefixed environment variable
(`BNFOLD_PORT=9000`) and is also a `bnfold serve` option (`--port 9000`); an
option given on the command line wins over the environment.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bnfold.models import DEFAULT_REPOSITORY
from bnfold.service.batch_policy import BatchPolicy
from bnfold.service.sessions import ExecutionMode, SessionConfig

MIB = 1 << 20
_BATCHING = BatchPolicy()


class Device(str, Enum):
    """Where sessions run. `auto` takes CUDA when onnxruntime-gpu and a GPU are present."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class LogLevel(str, Enum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


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


class Settings(BaseSettings):
    """Configuration of one `bnfold serve` process."""

    model_config = SettingsConfigDict(env_prefix="BNFOLD_", frozen=True, extra="ignore")

    repository: Path = Field(
        DEFAULT_REPOSITORY,
        description="Model repository to serve (REPO/NAME/VERSION packages); "
        "default: the embedded repository of built-in digits models.",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    device: Device = Field(Device.AUTO, description="Execution provider: auto, cpu or cuda.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="uvicorn worker processes; each loads every model (memory x workers).",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="onnxruntime intra-op threads per session run; 0: the CPUs / executor workers.",
    )
    executor_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Concurrent session runs; 0: the CPUs / intra-op threads.",
    )
    inter_op_threads: int = Field(
        1, ge=1, le=256, description="onnxruntime inter-op threads (parallel execution mode)."
    )
    execution_mode: ExecutionMode = Field(
        ExecutionMode.SEQUENTIAL,
        description="onnxruntime execution mode: sequential, or parallel branches.",
    )
    memory_arena: bool = Field(True, description="onnxruntime's CPU memory arena.")
    allow_spinning: bool = Field(
        False, description="Let idle onnxruntime threads busy-wait for work (burns cores)."
    )
    max_batch_size: int = Field(
        _BATCHING.max_batch_size,
        ge=0,
        description="Default rows per merged run; 0 or 1 turns dynamic batching off.",
    )
    max_queue_delay_us: int = Field(
        _BATCHING.max_queue_delay_us,
        ge=0,
        le=1_000_000,
        description="Default longest wait (µs) of a request for others to batch with.",
    )
    max_queue_size: int = Field(
        _BATCHING.max_queue_size,
        ge=1,
        description="Default requests waiting per model version before 503 + Retry-After.",
    )
    max_body_bytes: int = Field(64 * MIB, ge=1, description="Largest accepted request body.")
    max_decode_bytes: int = Field(
        0,
        ge=0,
        description="Estimated memory that decoding the requests in flight may take: one "
        "request above it gets 413, one that does not fit beside the others 503 + "
        "Retry-After; 0: 8 x max_body_bytes (a body of full-precision JSON floats is "
        "estimated at ~7x its size).",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=MIB,
        description="Largest request head (request line and header fields), 431 above. "
        "64 KiB: above Envoy's 60 KiB, the proxy in front of KServe, so nothing it passes "
        "is refused; at 1 MiB (the cap) a head still parses in milliseconds.",
    )
    max_header_count: int = Field(
        100, ge=1, le=10_000, description="Most header fields in a request (Envoy's), 431 above."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for load/unload; unset disables those endpoints."
    )
    log_level: LogLevel = Field(LogLevel.INFO, description="Log level; debug logs every request.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="How long in-flight requests may finish on shutdown."
    )

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
        return max(1, available_cpus() // (self.executor_workers or 1))

    @property
    def run_slots(self) -> int:
        """Executor size: enough concurrent runs to fill the CPUs, each with its own threads."""
        if self.executor_workers:
            return self.executor_workers
        return max(1, available_cpus() // self.session_threads)

    @property
    def decode_budget(self) -> int:
        """`max_decode_bytes`, or room for the largest body of JSON floats and then some."""
        return self.max_decode_bytes or 8 * self.max_body_bytes

    @property
    def batching(self) -> BatchPolicy:
        """The batching defaults; a package or REPO/NAME/config.json may override each field."""
        return BatchPolicy(self.max_batch_size, self.max_queue_delay_us, self.max_queue_size)

    def session_config(self, providers: tuple[str, ...]) -> SessionConfig:
        return SessionConfig(
            providers=providers,
            intra_op_threads=self.session_threads,
            execution_mode=self.execution_mode,
            inter_op_threads=self.inter_op_threads,
            memory_arena=self.memory_arena,
            spinning=self.allow_spinning,
        )
