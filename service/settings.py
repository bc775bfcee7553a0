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

MIB = 1 << 20


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
    intra_op_threads: int = Field(
        1, ge=1, le=256, description="onnxruntime intra-op threads per session run."
    )
    executor_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Concurrent session runs; 0 sizes the pool to CPU cores / intra-op threads.",
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
    def workers(self) -> int:
        """Executor size: enough concurrent runs to fill the cores, each with its own threads."""
        if self.executor_workers:
            return self.executor_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) // self.intra_op_threads)
