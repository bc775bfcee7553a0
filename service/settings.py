"""Every setting of the service, in one pydantic-settings class.

Each field is read from a `BNFOLD_`-prefixed environment variable
(`BNFOLD_PORT=9000`) and is also a `bnfold serve` option (`--port 9000`); an
option given on the command line wins over the environment.
"""

from __future__ import annotations

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
        1, ge=1, le=256, description="onnxruntime intra-op threads per session run."
    )
    executor_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Concurrent session runs; 0 sizes the pool to CPU cores / intra-op threads.",
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
    def run_slots(self) -> int:
        """Executor size: enough concurrent runs to fill the cores, each with its own threads."""
        if self.executor_workers:
            return self.executor_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) // self.intra_op_threads)

    @property
    def batching(self) -> BatchPolicy:
        """The batching defaults; a package or REPO/NAME/config.json may override each field."""
        return BatchPolicy(self.max_batch_size, self.max_queue_delay_us, self.max_queue_size)

    def session_config(self, providers: tuple[str, ...]) -> SessionConfig:
        return SessionConfig(
            providers=providers,
            intra_op_threads=self.intra_op_threads,
            execution_mode=self.execution_mode,
            inter_op_threads=self.inter_op_threads,
            memory_arena=self.memory_arena,
            spinning=self.allow_spinning,
        )
