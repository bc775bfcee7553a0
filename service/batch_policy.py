"""How a model batches: its dynamic batching policy, resolved once when the model loads.

Four sources, the first that sets a field wins: a load request's Triton config
override (`load_config`), the operator's REPO/NAME/config.json, the package's
manifest, the server's settings (`BNFOLD_MAX_BATCH_SIZE`...). Merging requests is only correct when every row
of a batch is computed independently of the others, which the package format
promises for a dynamic axis 0 (docs/package-format.md). So batching is off,
with the reason, for a model whose inputs or outputs do not all have -1 as
their first dimension, and for `max_batch_size` 0 or 1. The queue bound
(`max_queue_size`) holds either way.

Preferred batch sizes (only a load's config override sets them) follow
Triton's dynamic batcher: when the queue holds enough rows for a preferred
size, the run takes the largest such size and goes at once; otherwise it takes
what there is, up to `max_batch_size`, after waiting up to the queue delay
(`batch_ready`, `batch_limit`: the batcher asks these, and nothing else
decides it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfold.package_format import BatchingFields, ManifestTensor
from bnfold.service.settings import Settings


def _server_default(field: str) -> int:
    """A field's default: the server's setting (`BNFOLD_MAX_BATCH_SIZE`...) in `Settings`."""
    default: int = Settings.model_fields[field].default
    return default


@dataclass(frozen=True)
class BatchPolicy:
    """Rows per merged run, how long the oldest request may wait for company, the queue bound.

    The defaults are the server's settings' and measured best (BENCHMARKS.md): no wait,
    as Triton's default. A batch forms from the requests that queued while the model's
    runs were busy, so it grows with the load by itself; a wait only adds latency when
    the load is light.
    """

    max_batch_size: int = _server_default("max_batch_size")
    max_queue_delay_us: int = _server_default("max_queue_delay_us")
    max_queue_size: int = _server_default("max_queue_size")
    disabled_reason: str | None = None
    #: Ascending, each at most `max_batch_size`; empty: every batch as large as it can be.
    preferred_batch_sizes: tuple[int, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchPolicy:
        """The server's policy; a package or REPO/NAME/config.json may override each field."""
        return cls(settings.max_batch_size, settings.max_queue_delay_us, settings.max_queue_size)

    @property
    def batching(self) -> bool:
        return self.disabled_reason is None

    @property
    def max_queue_delay_seconds(self) -> float:
        return self.max_queue_delay_us / 1e6

    def batch_ready(self, queued_rows: int) -> bool:
        """Whether a run waiting for company may stop waiting: `max_batch_size` rows are
        queued, or a preferred size's worth (Triton sends a preferred batch at once)."""
        return queued_rows >= self.max_batch_size or any(
            queued_rows >= size for size in self.preferred_batch_sizes
        )

    def batch_limit(self, queued_rows: int) -> int:
        """The most rows the next merged run takes with `queued_rows` queued: the largest
        preferred size they fill, else `max_batch_size` (Triton's dynamic batcher)."""
        filled = [size for size in self.preferred_batch_sizes if size <= queued_rows]
        return max(filled) if filled else self.max_batch_size

    def dynamic_batching(self) -> dict[str, Any] | None:
        """Triton's `dynamic_batching` block of the model configuration; None when the
        model does not batch. Its `preferred_batch_size` is `max_batch_size` when no
        preferred sizes are set: the config keeps `max_batch_size` 0 (its dims keep
        the -1 batch axis), so this is where the limit shows."""
        if not self.batching:
            return None
        return {
            "preferred_batch_size": list(self.preferred_batch_sizes or (self.max_batch_size,)),
            "max_queue_delay_microseconds": self.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": self.max_queue_size},
        }

    def describe(self) -> dict[str, Any]:
        """The policy as model metadata shows it."""
        return {
            "enabled": self.batching,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "max_queue_size": self.max_queue_size,
            **({} if self.batching else {"disabled_reason": self.disabled_reason}),
        }


def _no_batch_axis(tensors: Sequence[ManifestTensor], kind: str) -> str | None:
    for tensor in tensors:
        if not tensor.shape or tensor.shape[0] != -1:
            shape = ", ".join(str(dim) for dim in tensor.shape)
            return f"{kind} {tensor.name!r} has no dynamic batch axis (shape [{shape}])"
    return None


def resolve_policy(
    sources: Sequence[BatchingFields],
    inputs: Sequence[ManifestTensor],
    outputs: Sequence[ManifestTensor],
    defaults: BatchPolicy,
    preferred_batch_sizes: Sequence[int] = (),
) -> BatchPolicy:
    """The effective policy: per field the first source that sets it, else `defaults`.

    `preferred_batch_sizes` must not exceed the resolved `max_batch_size` (the load
    config parser checks them against its own `max_batch_size`, which it requires
    with them, and that source comes first): a larger one is a ValueError here.
    """

    def pick(field: str) -> int:
        for source in sources:
            value = getattr(source, field)
            if value is not None:
                return int(value)
        return int(getattr(defaults, field))

    max_batch_size = pick("max_batch_size")
    reason = (
        _no_batch_axis(inputs, "input")
        or _no_batch_axis(outputs, "output")
        or (f"max_batch_size is {max_batch_size}" if max_batch_size <= 1 else None)
    )
    preferred = tuple(sorted(set(preferred_batch_sizes)))
    if preferred and (preferred[0] < 1 or preferred[-1] > max_batch_size):
        raise ValueError(
            f"preferred batch sizes {list(preferred)} must be between 1 and max_batch_size "
            f"{max_batch_size}"
        )
    return BatchPolicy(
        max_batch_size=max_batch_size,
        max_queue_delay_us=pick("max_queue_delay_us"),
        max_queue_size=pick("max_queue_size"),
        disabled_reason=reason,
        preferred_batch_sizes=preferred,
    )
