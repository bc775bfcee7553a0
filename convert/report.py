"""What a conversion found and did: the BN report and the tensor specs.

Plain dataclasses shared by the torch and ONNX paths, turned into the
manifest's JSON by `as_dict` (see docs/package-format.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, V2 datatype, shape with -1 for dynamic axes."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class FoldedBatchNorm:
    name: str
    into: str
    direction: str  # "forward": BN after the layer; "backward": BN before it


@dataclass(frozen=True)
class KeptBatchNorm:
    name: str
    reason: str


@dataclass(frozen=True)
class BatchNormLayer:
    """One BN of the original model with the statistics the compare endpoint needs.

    Only a BN with running statistics is a layer (see `running_statistics_problem`).
    """

    name: str
    channels: int
    eps: float
    running_mean: list[float]
    running_var: list[float]
    input_rank: int
    batch_mean_output: str
    batch_var_output: str
    channel_axis: int = 1


@dataclass
class BatchNormReport:
    """Every BN of the source, folded or kept; `by_pattern` counts the folds per ONNX pattern
    family (`convert/onnx/fold.py`; empty for torch sources, whose plan has no families)."""

    folded: list[FoldedBatchNorm] = field(default_factory=list)
    kept: list[KeptBatchNorm] = field(default_factory=list)
    layers: list[BatchNormLayer] = field(default_factory=list)
    by_pattern: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.folded) + len(self.kept)

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "folded": [asdict(item) for item in self.folded],
            "kept": [asdict(item) for item in self.kept],
            "layers": [asdict(item) for item in self.layers],
            **({"by_pattern": dict(self.by_pattern)} if self.by_pattern else {}),
        }


#: Appended to the kept reason of a BN that has no usable running statistics.
NOT_A_LAYER = "so it is not in batchnorm.layers (compare skips it)"


def running_statistics_problem(running_mean: np.ndarray, running_var: np.ndarray) -> str | None:
    """Why two arrays cannot be a manifest layer's running statistics, or None when they can.

    The service refuses a package whose layer statistics are not `channels`
    finite numbers each with a non-negative variance, and JSON has no NaN: a
    BN whose statistics fail this is kept and left out of `batchnorm.layers`,
    never written as a layer the service would reject.
    """
    mean, var = np.asarray(running_mean), np.asarray(running_var)
    if mean.ndim != 1 or mean.shape != var.shape or mean.size == 0:
        return "its running statistics are not two vectors of one length"
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        return "its running statistics are not finite"
    if (var < 0).any():
        return "its running variance is negative"
    return None


@dataclass
class ConversionResult:
    """What `bnfold convert` reports, whichever path (torch or ONNX) produced it.

    `verification` holds the manifest's verification block; `package_path` is
    the committed package directory.
    """

    name: str
    version: int
    package_path: str
    source_kind: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batchnorm: BatchNormReport
    verification: dict[str, object]
    node_counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "package": self.package_path,
            "source_kind": self.source_kind,
            "inputs": [asdict(spec) for spec in self.inputs],
            "outputs": [asdict(spec) for spec in self.outputs],
            "batchnorm": self.batchnorm.as_dict(),
            "verification": self.verification,
            "node_counts": self.node_counts,
        }
