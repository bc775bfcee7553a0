"""The PyTorch adapter of the conversion skeleton (`convert.conversion`).

fold: trace (fx) + shapes -> fold plan -> rewrite a copy; a second trace becomes
the train graph, a third the calibration graph (running statistics as inputs).
export: model.onnx, train.onnx and calibration.onnx with the TorchScript
exporter. verify: all three in onnxruntime against torch (`convert.torch.verify`).

The user's module is never modified: everything works on deep copies, and the
train-mode reference runs on its own copy, so no running statistic changes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import math
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.conversion import Folded, ProgressStep, Verified, convert, no_progress
from bnfold.convert.errors import InputShapeError, UntraceableModel, first_line
from bnfold.convert.onnx.io import save_model
from bnfold.convert.report import (
    BatchNormLayer,
    BatchNormReport,
    ConversionResult,
    FoldedBatchNorm,
)
from bnfold.convert.torch.calibration_graph import (
    build_calibration_module,
    finish_calibration_graph,
)
from bnfold.convert.torch.graph import FoldPlan, plan_folds
from bnfold.convert.torch.rewrite import apply_plan
from bnfold.convert.torch.sources import LoadedSource
from bnfold.convert.torch.train_graph import build_train_graph, replace_batch_statistics_bns
from bnfold.convert.torch.verify import INPUT_NAME, verify_calibration, verify_eval, verify_train
from bnfold.convert.verify import (
    VERIFY_SEED,
    check_batch_size,
    verification_batch_sizes,
    verification_block,
)
from bnfold.package_format import (
    CALIBRATION_GRAPH,
    EVAL_GRAPH,
    TRAIN_GRAPH,
    Source,
    batch_stat_output_names,
)

OPSET = 17


@dataclass
class TorchConversionRequest:
    loaded: LoadedSource
    repository: Path
    name: str | None = None
    version: int | None = None
    input_shape: tuple[int, ...] | None = None
    sample: np.ndarray | None = None


def convert_torch(
    request: TorchConversionRequest, step: ProgressStep = no_progress
) -> ConversionResult:
    """Run the whole conversion; raises ConvertError subclasses on any failure."""
    return convert(
        TorchAdapter(request.loaded, request.input_shape, request.sample),
        request.repository,
        name=request.name,
        version=request.version,
        step=step,
    )


class TorchAdapter:
    """A loaded torch module through fold, export and verify (`ConversionAdapter`)."""

    def __init__(
        self,
        loaded: LoadedSource,
        input_shape: tuple[int, ...] | None,
        sample: np.ndarray | None,
    ) -> None:
        input_shape = input_shape or loaded.input_shape
        if input_shape is None:
            raise InputShapeError(
                f"--input-shape is required for {loaded.ref}: bnfold cannot know its input, "
                "e.g. --input-shape 1,3,32,32"
            )
        largest_batch = max(input_shape[0], *_batch_sizes(input_shape))
        check_batch_size(
            (largest_batch, *input_shape[1:]),
            np.dtype(np.float32),
            f"input shape {','.join(map(str, input_shape))}",
        )
        self.loaded = loaded
        self.input_shape = input_shape
        self.sample = sample
        self.original = copy.deepcopy(loaded.module).eval()
        self.example = _random_batch(input_shape, batch=input_shape[0], seed=VERIFY_SEED)

    @property
    def source(self) -> Source:
        fields = {"kind": self.loaded.kind, "ref": self.loaded.ref, "sha256": self.loaded.sha256}
        if self.loaded.weights_sha256:
            fields["weights_sha256"] = self.loaded.weights_sha256
        return Source.model_validate(fields)

    @property
    def default_name(self) -> str:
        return self.loaded.default_name

    def tool_versions(self) -> Mapping[str, str | int]:
        return {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": OPSET,
        }

    def fold(self, step: ProgressStep) -> Folded:
        step("trace")
        self.eval_graph = trace(self.original, self.example, self.loaded.ref)
        self.output_names = _output_names(self.eval_graph, self.example)
        step("fold")
        self.plan = plan_folds(self.eval_graph)
        apply_plan(self.eval_graph, self.plan)
        replace_batch_statistics_bns(self.eval_graph, _batch_statistics_bn_paths(self.eval_graph))
        self.train_graph, self.stat_names = build_train_graph(
            trace(self.original, self.example, self.loaded.ref), self.plan.sites
        )
        calibration_trace = trace(self.original, self.example, self.loaded.ref)
        replace_batch_statistics_bns(
            calibration_trace, _batch_statistics_bn_paths(calibration_trace)
        )
        self.calibration = build_calibration_module(calibration_trace, self.plan.sites)
        return Folded(_batchnorm_report(self.original, self.plan), list(self.stat_names))

    def export(self, directory: Path) -> None:
        export_onnx(self.eval_graph, self.example, directory / EVAL_GRAPH, self.output_names, [])
        export_onnx(
            self.train_graph,
            self.example,
            directory / TRAIN_GRAPH,
            self.output_names,
            self.stat_names,
        )
        calibration_path = directory / CALIBRATION_GRAPH
        calibration = self.calibration
        export_onnx(
            calibration.module,
            self.example,
            calibration_path,
            self.output_names,
            [],
            statistics=(calibration.input_names, calibration.statistics),
        )
        model = onnx.load(str(calibration_path))
        finish_calibration_graph(model, calibration.layers)
        save_model(model, calibration_path, external=False)

    def verify(self, directory: Path) -> Verified:
        samples = _verification_batches(self.input_shape, self.sample)
        eval_agreement = verify_eval(self.original, directory / EVAL_GRAPH, samples)
        train_agreement = verify_train(
            self.original, directory / TRAIN_GRAPH, samples, self.plan, len(self.output_names)
        )
        calibration_agreement = verify_calibration(
            self.original, directory / CALIBRATION_GRAPH, samples, self.plan
        )
        return Verified(verification_block(eval_agreement, train_agreement, calibration_agreement))


def trace(module: nn.Module, example: torch.Tensor, ref: str) -> fx.GraphModule:
    """Trace a fresh copy with torch.fx and propagate shapes from `example`."""
    try:
        graph_module = fx.symbolic_trace(copy.deepcopy(module))
    except Exception as error:
        raise UntraceableModel(
            f"torch.fx cannot trace {ref}: {first_line(error, root_cause=True)}{_user_frame(error)}"
        ) from error
    try:
        # ShapeProp prints a traceback to stderr before raising; the user gets
        # the one-line cause instead.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(graph_module).propagate(example)
    except Exception as error:
        raise InputShapeError(
            f"{ref} does not run on an input of shape {tuple(example.shape)}: {first_line(error, root_cause=True)}"
        ) from error
    return graph_module


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: Sequence[str],
    stat_names: Sequence[str],
    *,
    statistics: tuple[Sequence[str], Sequence[torch.Tensor]] = ((), ()),
) -> None:
    """Export with the TorchScript exporter: fast, stable names, dynamic batch axis.

    `statistics` (names, example values) are extra inputs after the model's
    one, without a batch axis (calibration.onnx's running statistics).
    """
    dynamic_axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    extra_names, extra_values = statistics
    # The TorchScript exporter's deprecation and constant-folding chatter says
    # nothing actionable to a bnfold user; the checker below is the real gate.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example, *extra_values),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME, *extra_names],
            output_names=[*output_names, *stat_names],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)


def _output_names(graph_module: fx.GraphModule, example: torch.Tensor) -> list[str]:
    with torch.no_grad():
        result = graph_module(example)
    if isinstance(result, torch.Tensor):
        return ["output"]
    if isinstance(result, (tuple, list)) and all(isinstance(item, torch.Tensor) for item in result):
        return [f"output_{index}" for index in range(len(result))]
    raise UntraceableModel(
        f"the model returns {type(result).__name__}; bnfold exports a tensor or a tuple of tensors"
    )


def _batch_statistics_bn_paths(graph_module: fx.GraphModule) -> list[str]:
    return [
        path
        for path, module in graph_module.named_modules()
        if isinstance(module, _BatchNorm) and not module.track_running_stats
    ]


def _batchnorm_report(original: nn.Module, plan: FoldPlan) -> BatchNormReport:
    report = BatchNormReport(kept=list(plan.kept))
    report.folded = [FoldedBatchNorm(step.bn, step.layer, step.direction) for step in plan.steps]
    for site in plan.layer_sites:
        bn = original.get_submodule(site.module_path)
        assert isinstance(bn, _BatchNorm) and bn.running_mean is not None
        assert bn.running_var is not None
        mean_name, var_name = batch_stat_output_names(site.name)
        report.layers.append(
            BatchNormLayer(
                name=site.name,
                channels=int(bn.running_mean.numel()),
                eps=float(bn.eps),
                running_mean=bn.running_mean.tolist(),
                running_var=bn.running_var.tolist(),
                input_rank=site.input_rank,
                batch_mean_output=mean_name,
                batch_var_output=var_name,
            )
        )
    return report


def _random_batch(input_shape: Sequence[int], *, batch: int, seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.standard_normal((batch, *input_shape[1:])).astype(np.float32))


def _batch_sizes(input_shape: Sequence[int]) -> tuple[int, ...]:
    return verification_batch_sizes(math.prod(input_shape[1:]))


def _verification_batches(
    input_shape: Sequence[int], sample: np.ndarray | None
) -> list[np.ndarray]:
    batches = [
        _random_batch(input_shape, batch=size, seed=VERIFY_SEED + size).numpy()
        for size in _batch_sizes(input_shape)
    ]
    if sample is not None:
        batches.append(_check_sample(sample, input_shape))
    return batches


def _check_sample(sample: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    expected_tail = tuple(input_shape[1:])
    if sample.ndim == len(input_shape) - 1 and sample.shape == expected_tail:
        sample = sample[np.newaxis]
    if sample.ndim != len(input_shape) or sample.shape[1:] != expected_tail:
        raise InputShapeError(
            f"--sample has shape {sample.shape}; the model takes (N, {', '.join(map(str, expected_tail))})"
        )
    if not np.issubdtype(sample.dtype, np.number):
        raise InputShapeError(f"--sample must hold numbers, got dtype {sample.dtype}")
    return np.ascontiguousarray(sample, dtype=np.float32)


def _library_directories() -> tuple[Path, ...]:
    """Where torch's and bnfold's own modules live, by module identity (not by a folder name
    a user's project might share), found without importing anything."""
    packages = ("torch", "bnfold", "bnfold.convert", "bnfold.models", "bnfold.service")
    specs = [importlib.util.find_spec(package) for package in packages]
    return tuple(
        Path(directory).resolve()
        for spec in specs
        if spec is not None
        for directory in spec.submodule_search_locations or ()
    )


def _user_frame(error: BaseException) -> str:
    """Point at the user's line that fx choked on (the last frame outside torch and bnfold)."""
    libraries = _library_directories()
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not any(Path(frame.filename).resolve().is_relative_to(root) for root in libraries)
    ]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {Path(frame.filename).name}:{frame.lineno}: `{(frame.line or '').strip()}`)"
