"""onnxruntime sessions for a verified package, opened from its verified bytes only.

Every graph (model.onnx, train.onnx, and calibration.onnx for the drift
monitor when the package has one) is opened from the bytes `read_package` hashed, with full graph
optimisation, and their external data (if any) from the package's hashed
files in memory (`external_data`): onnxruntime reads no file. There is no
optimised-graph cache on disk: a cache is bytes the manifest does not vouch
for (a changed bias in it was served, and survived restarts), and the service
would have to write into the repository, which may be read-only. Measured
(RELIABILITY.md, Security): optimising costs 2-7 ms per digits graph and about
0.14 s per ResNet-18 graph, against 1 ms and 0.06 s (plus hashing it) to open
an optimised copy.

`load_model` also checks each session against the manifest: the manifest is
what requests are validated against, so a disagreement is a broken package,
and resolves the model's batching policy (`batch_policy`), a load's config
override (`load_config`) first. `warm_up` then runs zeros through every
session (warmup.py says which runs and why) before the registry reports the
version READY; `SessionConfig.warmup` (`--warmup/--no-warmup`) turns it off.

Session options (threads, execution mode, memory arena, spinning) come from
`SessionConfig`; the server's defaults are the ones that measured best on the
serving benchmark (BENCHMARKS.md): sequential execution (the folded graphs are
chains: parallel mode only adds scheduling), the arena on, no spinning, and one
run on every CPU (`Settings.session_threads`).

Memory (measured in BENCHMARKS.md, benchmarks/memory_bench.py). A session
holds its graph's weights once, in onnxruntime's own (optimised, reblocked)
copy; three things around it are not kept:

* the graph bytes: onnxruntime's Python `InferenceSession` keeps the bytes it
  was opened from, to re-create itself when an execution provider fails
  during a run. On the CPU there is no other provider to fall back to, so a
  CPU session lets go of them (`_release_graph_bytes`): 47 MB per ResNet-18
  graph, three graphs per version.
* one arena per session: with `memory_arena` on, every session allocates from
  one CPU arena shared by the process (`shared_cpu_arena`, onnxruntime's
  environment allocator), grown by what a run asks for rather than by powers
  of two, so a ResNet-18 version's three graphs and its neighbours reuse one
  another's free memory instead of each keeping its own largest run.
* warm-up's growth: the warm-up runs before a graph's last one ask
  onnxruntime to shrink that arena when they end (`warmup_run_options`),
  returning the regions the run no longer uses. A 32-row ResNet-18 run takes
  about 130 MB of activations; traffic that never merges 32 rows never needs
  them, and traffic that does grows the arena again on its first such batch
  (one allocation, measured within the run-to-run noise of a 32-row run).
  The last run (one row for model.onnx) keeps its memory: the first request
  reuses it, which is what tests/test_service_warmup.py's first-request test
  measures (shrinking after it too made that request's run 5x the next).

What glibc keeps of the freed parse and optimisation buffers (about 80 MB per
ResNet-18 graph) the registry hands back after each load (`release_free_heap`).

train.onnx serves compare alone, so by default its session is closed once the
load has opened, checked and warmed it, and the first compare reopens it from
the package, hash-checked again (`TrainGraph`): 46 MB less per ResNet-18
version for the servers that never compare, a first compare 0.14 s slower for those
that do (`--resident-train-graph` keeps it open).

calibration.onnx (schema 2 packages) is opened only when drift monitoring is
on (`SessionConfig.calibration_graph`), with one intra-op thread: the monitor
runs it on a sample of the traffic, beside the serving runs, and must not
compete with them for the cores. Nor for a lock: its worker runs at the lowest
CPU priority (drift_monitor.py), and the shared arena is one mutex that every
allocation of every session takes; a worker preempted while holding it would
stall the serving run that waits for it until a core is idle for the worker
(priority inversion). So its session allocates with plain malloc, no arena: a
run every few seconds needs no cache of buffers, and no arena keeps its largest run. A calibration graph that cannot be opened
or does not fit the manifest leaves the model serving, without drift
monitoring (`LoadedModel.calibration_reason` says why): monitoring is an
observer, never a reason to stop serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bnfold.package_format import (
    CALIBRATION_GRAPH,
    EVAL_GRAPH,
    ONNX_TYPES,
    TRAIN_GRAPH,
    Manifest,
    ManifestLayer,
    ManifestTensor,
    input_stat_output_names,
)
from bnfold.service.batch_policy import BatchPolicy, resolve_policy
from bnfold.service.errors import PackageError
from bnfold.service.external_data import external_file_table
from bnfold.service.heap import release_free_heap
from bnfold.service.load_config import ConfigOverride
from bnfold.service.repository import (
    PackageLocation,
    VerifiedPackage,
    read_verified_file,
    relative_to_repository,
)
from bnfold.service.settings import ExecutionMode, Settings
from bnfold.service.warmup import WarmupRun, plan_warmup, zero_feeds

logger = logging.getLogger("bnfold.service")


@dataclass(frozen=True)
class SessionConfig:
    """How every session is opened. `inter_op_threads` only matters in parallel mode;
    `spinning` lets idle intra-op threads busy-wait for the next node (lower latency
    per run, but cores burnt that concurrent runs and the event loop need)."""

    providers: tuple[str, ...]
    intra_op_threads: int = 1
    execution_mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    inter_op_threads: int = 1
    memory_arena: bool = True
    spinning: bool = False
    #: Open calibration.onnx when the package has one (drift monitoring on).
    calibration_graph: bool = True
    #: Run the warm-up (`warm_up`) before a loaded version is served.
    warmup: bool = True
    #: Keep train.onnx's session open after load (`TrainGraph`); else the registry releases it.
    resident_train_graph: bool = False
    #: The most bytes of inputs a warm-up run may take: the largest request body.
    warmup_max_bytes: int = Settings.model_fields["max_body_bytes"].default

    @classmethod
    def from_settings(cls, settings: Settings, providers: tuple[str, ...]) -> SessionConfig:
        return cls(
            providers=providers,
            intra_op_threads=settings.session_threads,
            execution_mode=settings.execution_mode,
            inter_op_threads=settings.inter_op_threads,
            memory_arena=settings.memory_arena,
            spinning=settings.allow_spinning,
            calibration_graph=settings.drift_monitoring,
            warmup=settings.warmup,
            resident_train_graph=settings.resident_train_graph,
            warmup_max_bytes=settings.max_body_bytes,
        )

    def for_calibration(self) -> SessionConfig:
        """The drift monitor's: one thread, sequential, so it never competes with serving;
        no memory arena, so it shares no lock with serving runs (module docstring)."""
        return dataclasses.replace(
            self,
            intra_op_threads=1,
            inter_op_threads=1,
            execution_mode=ExecutionMode.SEQUENTIAL,
            spinning=False,
            memory_arena=False,
        )


SCHEMA_1_REASON = (
    "the package has schema version 1, which predates calibration.onnx: convert the model "
    "again (bnfold convert) to monitor its drift"
)
CALIBRATION_OFF_REASON = "calibration.onnx was not opened: drift monitoring is off"


@dataclass(frozen=True)
class LoadedModel:
    """One servable package: its sessions and the manifest they were checked against.

    `calibration_session` is None when the drift monitor cannot use the package,
    and `calibration_reason` says why; `calibration_outputs` are the per-layer
    `input_mean, input_var, input_count` outputs it runs, in manifest order.
    `warmup` are the warm-up runs made (none with warm-up off), in
    `warmup_seconds`.
    """

    name: str
    version: int
    path: Path
    manifest: Manifest
    eval_session: ort.InferenceSession
    train: TrainGraph
    providers: tuple[str, ...]
    load_seconds: float
    batching: BatchPolicy
    calibration_session: ort.InferenceSession | None = None
    calibration_reason: str = SCHEMA_1_REASON
    calibration_outputs: tuple[str, ...] = ()
    warmup: tuple[WarmupRun, ...] = ()
    warmup_seconds: float = 0.0

    @property
    def train_session(self) -> ort.InferenceSession:
        """train.onnx's session, opened now if it is not resident (`TrainGraph`): blocks."""
        return self.train.session()

    @property
    def inputs(self) -> tuple[ManifestTensor, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[ManifestTensor, ...]:
        return self.manifest.outputs

    @property
    def layers(self) -> tuple[ManifestLayer, ...]:
        return self.manifest.batchnorm.layers


CPU = "CPUExecutionProvider"
#: onnxruntime's CPU device in a run's arena shrink list
_CPU_ARENA = "cpu:0"
_ARENA_EXTEND_SAME_AS_REQUESTED = 1
_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def shared_cpu_arena() -> None:
    """Register the process's shared CPU arena with onnxruntime, once.

    onnxruntime's environment (and so its allocators) is one per process: this
    mirrors that state, it does not add any. Regions are allocated at the size
    asked for (not the next power of two), so a shrink can return every region
    no run uses, the first one included.
    """
    global _shared_arena_registered
    with _shared_arena_lock:
        if _shared_arena_registered:
            return
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            ),
            ort.OrtArenaCfg({"arena_extend_strategy": _ARENA_EXTEND_SAME_AS_REQUESTED}),
        )
        _shared_arena_registered = True


def warmup_run_options(config: SessionConfig) -> ort.RunOptions | None:
    """A warm-up run's options: shrink the shared CPU arena when the run ends (module
    docstring). None without the arena, or off the CPU, where no such arena is shared."""
    if not config.memory_arena or tuple(config.providers) != (CPU,):
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", _CPU_ARENA)
    return options


def _options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if config.execution_mode is ExecutionMode.PARALLEL
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.enable_cpu_mem_arena = config.memory_arena
    if config.memory_arena:
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 3
    spin = "1" if config.spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if config.spinning:
        # spin between a run's parallel sections only: when the last run ends, the threads
        # sleep instead of busy-waiting on the cores the event loop needs next
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def open_session(
    graph: bytes, external_files: Mapping[str, bytes], config: SessionConfig
) -> ort.InferenceSession:
    """A session on `graph` whose external data comes from `external_files`, never the disk."""
    options = _options(config)
    names = list(external_files)
    buffers = [external_files[name] for name in names]
    options.add_external_initializers_from_files_in_memory(
        names, buffers, [len(buffer) for buffer in buffers]
    )
    session = ort.InferenceSession(graph, options, providers=list(config.providers))
    _release_graph_bytes(session)
    return session


def _release_graph_bytes(session: ort.InferenceSession) -> None:
    """Let a CPU session drop the copy of its graph bytes onnxruntime's Python class keeps.

    The class keeps them only to re-create the session on another provider
    when a run fails in its execution provider (its `set_providers` fallback);
    a CPU session has no other provider, so the fallback is turned off with
    them. Sessions on another provider keep both.
    """
    if session.get_providers() == [CPU] and hasattr(session, "_model_bytes"):
        session.disable_fallback()
        session._model_bytes = None


#: `run(output_names, feeds, run_options)`: a session's run, as `session_runner` picks it.
SessionRun = Callable[[Sequence[str], Mapping[str, np.ndarray], "ort.RunOptions | None"], list]


def session_runner(session: ort.InferenceSession) -> SessionRun:
    """The session's native run for a CPU session, else its Python class's `run`.

    The class's `run` checks, on every call, that every graph input is fed, that no
    OrtValue belongs to another session, and that WebGPU graph capture is off, then
    retries a run that fails in its execution provider on the fallback providers.
    For the batcher's runs none of it can apply: the feeds are numpy arrays that
    `dataplane.check_inputs` matched to the manifest, whose inputs the session's
    were checked against at load, and a CPU session has no fallback
    (`_release_graph_bytes`). Skipping it saves about 1 µs of a 5 µs digits-MLP run
    on the event loop (BENCHMARKS.md). Other providers keep the class's `run`, and so
    its fallback.
    """
    native = getattr(session, "_sess", None)
    if native is not None and session.get_providers() == [CPU]:
        return native.run
    return session.run


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
    statistics: str = "batch statistics",
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
        raise PackageError(f"{graph_file} lacks the {statistics} outputs {missing}")
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


def calibration_outputs(manifest: Manifest) -> tuple[str, ...]:
    """calibration.onnx's per-layer statistic outputs the drift monitor asks for."""
    return tuple(
        name for layer in manifest.batchnorm.layers for name in input_stat_output_names(layer.name)
    )


def _open_calibration(
    package: VerifiedPackage, config: SessionConfig
) -> tuple[ort.InferenceSession | None, str]:
    """(calibration.onnx's session, "") or (None, why the drift monitor cannot use it)."""
    manifest = package.manifest
    if not manifest.has_calibration_graph:
        return None, SCHEMA_1_REASON
    if not config.calibration_graph:
        return None, CALIBRATION_OFF_REASON
    graph = package.contents[CALIBRATION_GRAPH]
    try:
        external_files = external_file_table(graph, CALIBRATION_GRAPH, package.contents)
        session = open_session(graph, external_files, config.for_calibration())
        _check_signature(
            session, CALIBRATION_GRAPH, manifest, calibration_outputs(manifest), "input statistics"
        )
    except PackageError as exc:
        reason = exc.message
    except Exception as exc:
        reason = f"onnxruntime cannot load {CALIBRATION_GRAPH}: {exc}"
    else:
        return session, ""
    location = package.location
    logger.warning(
        "%s version %d serves without drift monitoring: %s",
        location.name,
        location.version,
        reason,
    )
    return None, reason


class _VerifiedFiles(Mapping[str, bytes]):
    """A loaded package's files, each read again when asked for and checked against
    the sha256 of the manifest the version was loaded with."""

    def __init__(self, location: PackageLocation, manifest: Manifest) -> None:
        self._location, self._manifest = location, manifest
        self._read: dict[str, bytes] = {}  # each file read and hashed once per reopen

    def __getitem__(self, file_name: str) -> bytes:
        if file_name not in self._manifest.files:
            raise KeyError(file_name)
        content = self._read.get(file_name)
        if content is None:
            content = self._read[file_name] = read_verified_file(
                self._location, self._manifest, file_name
            )
        return content

    def __iter__(self) -> Iterator[str]:
        return iter(self._manifest.files)

    def __len__(self) -> int:
        return len(self._manifest.files)


def batch_statistic_outputs(manifest: Manifest) -> tuple[str, ...]:
    """train.onnx's per-layer batch mean and variance outputs, in manifest order."""
    return tuple(
        name
        for layer in manifest.batchnorm.layers
        for name in (layer.batch_mean_output, layer.batch_var_output)
    )


class TrainGraph:
    """train.onnx's session, which only compare runs: resident, or opened on demand.

    A ResNet-18's train graph holds its 47 MB of weights and serves no inference,
    so by default (`--on-demand-train-graph`) the registry `release`s it once
    `load_model` has opened and checked it and `warm_up` has run it: the load
    still proves it works. The first compare then reopens it from the package
    directory, the file hash-checked again against the manifest the version was
    loaded with (the service serves no byte it has not verified, and keeps no
    copy of the bytes, which would cost what the session saves), and keeps it.
    A file changed since load fails that compare with a `PackageError` (503)
    and leaves inference alone; the compares of the next `REOPEN_RETRY_SECONDS`
    get the same answer without reading anything, then one tries again.
    """

    #: After a failed reopen, how long compares get its error instead of another attempt
    #: (each one reads, hashes and parses the whole graph).
    REOPEN_RETRY_SECONDS = 1.0

    def __init__(
        self,
        location: PackageLocation,
        manifest: Manifest,
        config: SessionConfig,
        session: ort.InferenceSession,
    ) -> None:
        self._location, self._manifest, self._config = location, manifest, config
        self._session: ort.InferenceSession | None = session
        self._lock = threading.Lock()
        self._failure: tuple[PackageError, float] | None = None  # the last failed reopen, when
        #: times the session was reopened on demand since load
        self.reopened = 0

    @property
    def resident(self) -> bool:
        return self._session is not None

    def session(self) -> ort.InferenceSession:
        """The session, reopened from the package first when it was released (blocks)."""
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._session is not None:
                return self._session
            failure = self._failure
            if failure is not None and time.monotonic() - failure[1] < self.REOPEN_RETRY_SECONDS:
                raise failure[0]
            try:
                self._session = self._reopen()
            except PackageError as exc:
                self._failure = (exc, time.monotonic())
                raise
            finally:
                release_free_heap()  # what parsing and optimising the graph freed (module doc)
            self._failure = None
            self.reopened += 1
            return self._session

    async def session_async(self) -> ort.InferenceSession:
        """`session`, with a reopen (file reads, hashing, graph optimisation) off the loop."""
        session = self._session
        return session if session is not None else await asyncio.to_thread(self.session)

    def release(self) -> None:
        """Close the session; the caller hands the freed heap back (`release_free_heap`)."""
        with self._lock:
            self._session = None

    def _reopen(self) -> ort.InferenceSession:
        location = self._location
        started = time.perf_counter()
        files = _VerifiedFiles(location, self._manifest)
        try:
            graph = files[TRAIN_GRAPH]
            external_files = external_file_table(graph, TRAIN_GRAPH, files)
            try:
                session = open_session(graph, external_files, self._config)
            except Exception as exc:
                raise PackageError(f"onnxruntime cannot load {TRAIN_GRAPH}: {exc}") from exc
            _check_signature(
                session, TRAIN_GRAPH, self._manifest, batch_statistic_outputs(self._manifest)
            )
        except PackageError as exc:
            reason = relative_to_repository(exc.message, location.root)
            logger.warning(
                "%s version %d: %s cannot be reopened for compare: %s",
                location.name,
                location.version,
                TRAIN_GRAPH,
                reason,
            )
            raise PackageError(
                f"{location.name} version {location.version}: {TRAIN_GRAPH} cannot be "
                f"reopened for compare: {reason}"
            ) from None
        logger.info(
            "opened %s of %s version %d for compare in %.2f s (hash checked again)",
            TRAIN_GRAPH,
            location.name,
            location.version,
            time.perf_counter() - started,
        )
        return session


def load_model(
    package: VerifiedPackage,
    config: SessionConfig,
    batching_defaults: BatchPolicy = BatchPolicy(),
    override: ConfigOverride = ConfigOverride(),
) -> LoadedModel:
    """Open and check the sessions of `package`. Raises `PackageError` with the reason
    (model.onnx and train.onnx; calibration.onnx only decides whether drift is monitored).

    `override`: a load's Triton config (`load_config`), above REPO/NAME/config.json.
    """
    started = time.perf_counter()
    location, manifest = package.location, package.manifest
    sessions = {}
    for graph_file, graph in ((EVAL_GRAPH, package.eval_graph), (TRAIN_GRAPH, package.train_graph)):
        external_files = external_file_table(graph, graph_file, package.contents)
        try:
            sessions[graph_file] = open_session(graph, external_files, config)
        except Exception as exc:
            raise PackageError(f"onnxruntime cannot load {graph_file}: {exc}") from exc
    _check_signature(sessions[EVAL_GRAPH], EVAL_GRAPH, manifest, ())
    _check_signature(
        sessions[TRAIN_GRAPH], TRAIN_GRAPH, manifest, batch_statistic_outputs(manifest)
    )
    calibration_session, calibration_reason = _open_calibration(package, config)
    return LoadedModel(
        name=location.name,
        version=location.version,
        path=location.path,
        manifest=manifest,
        eval_session=sessions[EVAL_GRAPH],
        train=TrainGraph(location, manifest, config, sessions[TRAIN_GRAPH]),
        providers=tuple(sessions[EVAL_GRAPH].get_providers()),
        load_seconds=time.perf_counter() - started,
        batching=resolve_policy(
            (override.batching, package.config.batching, manifest.batching),
            manifest.inputs,
            manifest.outputs,
            batching_defaults,
            override.preferred_batch_sizes,
        ),
        calibration_session=calibration_session,
        calibration_reason=calibration_reason,
        calibration_outputs=calibration_outputs(manifest) if calibration_session else (),
    )


def warm_up(
    model: LoadedModel, max_bytes: int, run_options: ort.RunOptions | None = None
) -> LoadedModel:
    """`model` once its warm-up runs are made (`plan_warmup`, inputs of at most
    `max_bytes`), with them recorded. `run_options` (`warmup_run_options`: shrink the
    arena) go with every run but each graph's last, whose memory the first requests reuse.

    Raises `PackageError` naming the graph and rows when model.onnx or train.onnx
    cannot run zeros: a version that fails them would fail requests. A failing
    calibration.onnx only takes the drift monitor off the version, as when it
    cannot be opened.
    """
    started = time.perf_counter()
    plan = plan_warmup(
        model.batching,
        model.inputs,
        calibration=model.calibration_session is not None,
        max_bytes=max_bytes,
    )
    sessions = {EVAL_GRAPH: model.eval_session, TRAIN_GRAPH: model.train_session}
    if model.calibration_session is not None:
        sessions[CALIBRATION_GRAPH] = model.calibration_session
    made: list[WarmupRun] = []
    last_of_graph = {run.graph: index for index, run in enumerate(plan)}
    for index, run in enumerate(plan):
        # a graph's last run (the one-row shape most first requests have) keeps its memory
        shrink = run_options if index != last_of_graph[run.graph] else None
        try:
            sessions[run.graph].run(None, zero_feeds(model.inputs, run.rows), shrink)
        except Exception as exc:
            rows = f"{run.rows} row{'' if run.rows == 1 else 's'}"
            reason = f"{run.graph} failed its warm-up run on zeros of {rows}: {exc}"
            if run.graph != CALIBRATION_GRAPH:
                raise PackageError(reason) from exc
            logger.warning(
                "%s version %d serves without drift monitoring: %s",
                model.name,
                model.version,
                reason,
            )
            model = dataclasses.replace(
                model, calibration_session=None, calibration_reason=reason, calibration_outputs=()
            )
            continue
        made.append(run)
    return dataclasses.replace(
        model, warmup=tuple(made), warmup_seconds=time.perf_counter() - started
    )
