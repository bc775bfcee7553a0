"""onnxruntime sessions for a verified package, with the optimised graph cached on disk.

Both graphs are opened with full graph optimisation. The optimised graph is
saved next to the package (`model.ort-opt.cpu.<key>.onnx`) and opened without
re-optimising on the next start. The key hashes what the optimised graph
depends on: the source graph's sha256, the onnxruntime version, the providers
and the CPU (ORT_ENABLE_ALL emits hardware-specific kernels such as NCHWc
layouts). The file is written under a temporary name and renamed, so a reader
never sees half of it; a read-only package, or a cache onnxruntime rejects, only
costs the optimisation time, never the start.

`load_model` also checks each session against the manifest: the manifest is
what requests are validated against, so a disagreement is a broken package,
and resolves the model's batching policy (`batch_policy`).

Session options (threads, execution mode, memory arena, spinning) come from
`SessionConfig`; the server's defaults are the ones that measured best on the
serving benchmark (BENCHMARKS.md): sequential execution (the folded graphs are
chains: parallel mode only adds scheduling), the arena on, no spinning, and one
run on every CPU (`Settings.session_threads`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import onnxruntime as ort

from bnfold.service.batch_policy import BatchPolicy, resolve_policy
from bnfold.service.errors import PackageError
from bnfold.service.protocol import ONNX_TYPES
from bnfold.service.repository import (
    EVAL_GRAPH,
    TRAIN_GRAPH,
    Manifest,
    ManifestLayer,
    ManifestTensor,
    VerifiedPackage,
)

CACHE_MARKER = ".ort-opt."
logger = logging.getLogger("bnfold.service")


class ExecutionMode(str, Enum):
    """onnxruntime's execution mode: nodes one after another, or independent branches at once."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(frozen=True)
class SessionConfig:
    """How every session is opened. `inter_op_threads` only matters in parallel mode;
    `spinning` lets idle intra-op threads busy-wait for the next node (lower latency
    per run, but cores burnt that concurrent runs and the event loop need)."""

    providers: tuple[str, ...]
    intra_op_threads: int = 1
    cache_optimized: bool = True
    execution_mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    inter_op_threads: int = 1
    memory_arena: bool = True
    spinning: bool = False


@dataclass(frozen=True)
class LoadedModel:
    """One servable package: both sessions and the manifest they were checked against."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    eval_session: ort.InferenceSession
    train_session: ort.InferenceSession
    providers: tuple[str, ...]
    load_seconds: float
    batching: BatchPolicy

    @property
    def inputs(self) -> tuple[ManifestTensor, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[ManifestTensor, ...]:
        return self.manifest.outputs

    @property
    def layers(self) -> tuple[ManifestLayer, ...]:
        return self.manifest.batchnorm.layers


@functools.cache
def _hardware_fingerprint() -> str:
    """The CPU's feature flags (Linux) or processor name: what ORT_ENABLE_ALL may specialise on."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return f"{platform.machine()}:{line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"{platform.machine()}:{platform.processor()}"


def _provider_tag(providers: tuple[str, ...]) -> str:
    return providers[0].removesuffix("ExecutionProvider").lower()


def cache_path(package_dir: Path, graph_file: str, sha256: str, providers: tuple[str, ...]) -> Path:
    key_source = "|".join([sha256, ort.__version__, ",".join(providers), _hardware_fingerprint()])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    stem = graph_file.removesuffix(".onnx")
    return package_dir / f"{stem}{CACHE_MARKER}{_provider_tag(providers)}.{key}.onnx"


def _options(config: SessionConfig, *, optimise: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if config.execution_mode is ExecutionMode.PARALLEL
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.enable_cpu_mem_arena = config.memory_arena
    options.log_severity_level = 3
    spin = "1" if config.spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def _remove_stale_caches(target: Path) -> None:
    stem, _, rest = target.name.partition(CACHE_MARKER)
    tag = rest.split(".", 1)[0]
    for stale in target.parent.glob(f"{stem}{CACHE_MARKER}{tag}.*.onnx"):
        if stale != target:
            stale.unlink(missing_ok=True)


def open_session(
    graph: bytes, graph_file: str, sha256: str, package_dir: Path, config: SessionConfig
) -> ort.InferenceSession:
    """A session on `graph`, from the optimised cache when there is a valid one."""
    providers = list(config.providers)
    cached = cache_path(package_dir, graph_file, sha256, config.providers)
    if config.cache_optimized and cached.is_file():
        try:
            return ort.InferenceSession(
                str(cached), _options(config, optimise=False), providers=providers
            )
        except Exception as exc:  # a truncated or foreign cache: rebuild it below
            logger.warning("ignoring optimised cache %s: %s", cached, exc)
            cached.unlink(missing_ok=True)
    options = _options(config, optimise=True)
    staging = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    writable = config.cache_optimized and os.access(package_dir, os.W_OK)
    if writable:
        options.optimized_model_filepath = str(staging)
    try:
        session = ort.InferenceSession(graph, options, providers=providers)
    except Exception:
        staging.unlink(missing_ok=True)
        if not writable:
            raise
        # Saving the optimised graph can fail on its own (an EP that cannot serialise):
        # open the session without the cache rather than not at all.
        return ort.InferenceSession(graph, _options(config, optimise=True), providers=providers)
    if writable and staging.is_file():
        try:
            os.replace(staging, cached)
            _remove_stale_caches(cached)
        except OSError as exc:
            logger.debug("could not keep the optimised cache %s: %s", cached, exc)
            staging.unlink(missing_ok=True)
    return session


def _shape_fits(declared: tuple[int, ...], session_shape: list[object]) -> bool:
    if len(declared) != len(session_shape):
        return False
    return all(
        not isinstance(actual, int) or actual <= 0 or want in (-1, actual)
        for want, actual in zip(declared, session_shape, strict=True)
    )


def _check_signature(
    session: ort.InferenceSession,
    graph_file: str,
    manifest: Manifest,
    extra_outputs: tuple[str, ...],
) -> None:
    inputs = {arg.name: arg for arg in session.get_inputs()}
    if set(inputs) != {tensor.name for tensor in manifest.inputs}:
        raise PackageError(
            f"{graph_file} has inputs {sorted(inputs)}, the manifest "
            f"{[tensor.name for tensor in manifest.inputs]}"
        )
    outputs = {arg.name: arg for arg in session.get_outputs()}
    output_names = [arg.name for arg in session.get_outputs()]
    expected_outputs = [tensor.name for tensor in manifest.outputs]
    if output_names[: len(expected_outputs)] != expected_outputs:
        raise PackageError(
            f"{graph_file} starts with outputs {output_names[: len(expected_outputs)]}, "
            f"the manifest lists {expected_outputs}"
        )
    missing = [name for name in extra_outputs if name not in outputs]
    if missing:
        raise PackageError(f"{graph_file} lacks the batch statistics outputs {missing}")
    for tensor in (*manifest.inputs, *manifest.outputs):
        arg = inputs.get(tensor.name) or outputs[tensor.name]
        datatype = ONNX_TYPES.get(arg.type)
        if datatype != tensor.datatype:
            raise PackageError(
                f"{graph_file}: {tensor.name!r} is {arg.type} but the manifest says {tensor.datatype}"
            )
        if not _shape_fits(tensor.shape, arg.shape):
            raise PackageError(
                f"{graph_file}: {tensor.name!r} has shape {arg.shape}, "
                f"the manifest says {list(tensor.shape)}"
            )


def load_model(
    package: VerifiedPackage,
    config: SessionConfig,
    batching_defaults: BatchPolicy = BatchPolicy(),
) -> LoadedModel:
    """Open and check both sessions of `package`. Raises `PackageError` with the reason."""
    started = time.perf_counter()
    location, manifest = package.location, package.manifest
    sessions = {}
    for graph_file, graph in ((EVAL_GRAPH, package.eval_graph), (TRAIN_GRAPH, package.train_graph)):
        try:
            sessions[graph_file] = open_session(
                graph, graph_file, package.sha256[graph_file], location.path, config
            )
        except Exception as exc:
            raise PackageError(f"onnxruntime cannot load {graph_file}: {exc}") from exc
    statistics = tuple(
        name
        for layer in manifest.batchnorm.layers
        for name in (layer.batch_mean_output, layer.batch_var_output)
    )
    _check_signature(sessions[EVAL_GRAPH], EVAL_GRAPH, manifest, ())
    _check_signature(sessions[TRAIN_GRAPH], TRAIN_GRAPH, manifest, statistics)
    return LoadedModel(
        name=location.name,
        version=location.version,
        path=location.path,
        manifest=manifest,
        eval_session=sessions[EVAL_GRAPH],
        train_session=sessions[TRAIN_GRAPH],
        providers=tuple(sessions[EVAL_GRAPH].get_providers()),
        load_seconds=time.perf_counter() - started,
        batching=resolve_policy(
            (package.config.batching, manifest.batching),
            manifest.inputs,
            manifest.outputs,
            batching_defaults,
        ),
    )
