"""The PyTorch conversion, end to end.

source → trace (fx) + shapes → fold plan → rewrite a copy → export model.onnx
and train.onnx → verify both with onnxruntime against torch → package.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.errors import InputShapeError, UntraceableModel, first_line
from bnfold.convert.package import staged_package
from bnfold.convert.report import (
    V2_DATATYPES,
    BatchNormLayer,
    BatchNormReport,
    ConversionResult,
    FoldedBatchNorm,
    TensorSpec,
    batch_stat_output_names,
)
from bnfold.convert.torch.graph import FoldPlan, plan_folds
from bnfold.convert.torch.rewrite import apply_plan
from bnfold.convert.torch.sources import LoadedSource
from bnfold.convert.torch.train_graph import build_train_graph, replace_batch_statistics_bns
from bnfold.convert.verify import Agreement, check_batch_size, verification_block

OPSET = 17
INPUT_NAME = "input"
#: Verification batch sizes: small inputs get larger batches; ImageNet-sized
#: inputs smaller ones, so verifying costs seconds, not minutes. Batches of
#: more than one row also verify train.onnx.
SMALL_INPUT_BATCH_SIZES = (1, 4, 16)
LARGE_INPUT_BATCH_SIZES = (1, 2, 4)
LARGE_INPUT_ELEMENTS = 16_384
VERIFY_SEED = 20261123

ProgressStep = Callable[[str], None]


@dataclass
class TorchConversionRequest:
    loaded: LoadedSource
    repository: Path
    name: str | None = None
    version: int | None = None
    input_shape: tuple[int, ...] | None = None
    sample: np.ndarray | None = None


def convert_torch(
    request: TorchConversionRequest, step: ProgressStep | None = None
) -> ConversionResult:
    """Run the whole conversion; raises ConvertError subclasses on any failure."""
    advance = step or (lambda _label: None)
    loaded = request.loaded
    input_shape = request.input_shape or loaded.input_shape
    if input_shape is None:
        raise InputShapeError(
            f"--input-shape is required for {loaded.ref}: bnfold cannot know its input, "
            "e.g. --input-shape 1,3,32,32"
        )
    largest_batch = max(input_shape[0], *_verification_batch_sizes(input_shape))
    check_batch_size(
        (largest_batch, *input_shape[1:]),
        np.dtype(np.float32),
        f"input shape {','.join(map(str, input_shape))}",
    )
    original = copy.deepcopy(loaded.module).eval()
    example = _random_batch(input_shape, batch=input_shape[0], seed=VERIFY_SEED)

    advance("trace")
    eval_graph = trace(original, example, loaded.ref)
    output_names = _output_names(eval_graph, example)

    advance("fold")
    plan = plan_folds(eval_graph)
    apply_plan(eval_graph, plan)
    replace_batch_statistics_bns(eval_graph, _batch_statistics_bn_paths(eval_graph))
    train_graph, stat_names = build_train_graph(trace(original, example, loaded.ref), plan.sites)

    name = request.name or loaded.default_name
    with staged_package(request.repository, name, request.version) as staged:
        advance("export")
        model_path = staged.directory / "model.onnx"
        train_path = staged.directory / "train.onnx"
        export_onnx(eval_graph, example, model_path, output_names, [])
        export_onnx(train_graph, example, train_path, output_names, stat_names)

        advance("verify")
        samples = _verification_batches(input_shape, request.sample)
        eval_agreement = verify_eval(original, model_path, samples)
        train_agreement = verify_train(original, train_path, samples, plan, len(output_names))
        verification = verification_block(eval_agreement, train_agreement)

        advance("write")
        report = _batchnorm_report(original, plan)
        inputs, outputs = _tensor_specs(model_path)
        model_proto = onnx.load(str(model_path), load_external_data=False)
        node_counts = {
            "batchnorm_before": report.total,
            "batchnorm_after": sum(
                n.op_type == "BatchNormalization" for n in model_proto.graph.node
            ),
            "nodes_after": len(model_proto.graph.node),
        }
        source = {"kind": loaded.kind, "ref": loaded.ref, "sha256": loaded.sha256}
        if loaded.weights_sha256:
            source["weights_sha256"] = loaded.weights_sha256
        manifest = {
            "source": source,
            "tool_versions": {
                "bnfold": package_version("bnfold"),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "opset": OPSET,
            },
            "inputs": [spec.__dict__ for spec in inputs],
            "outputs": [spec.__dict__ for spec in outputs],
            "batchnorm": report.as_dict(),
            "train_outputs": stat_names,
            "verification": verification,
            "node_counts": node_counts,
        }
        final_path = staged.commit(manifest)
    return ConversionResult(
        name=name,
        version=staged.version,
        package_path=str(final_path),
        source_kind=loaded.kind,
        inputs=inputs,
        outputs=outputs,
        batchnorm=report,
        verification=verification,
        node_counts=node_counts,
    )


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
) -> None:
    """Export with the TorchScript exporter: fast, stable names, dynamic batch axis."""
    dynamic_axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    # The TorchScript exporter's deprecation and constant-folding chatter says
    # nothing actionable to a bnfold user; the checker below is the real gate.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[*output_names, *stat_names],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)


def verify_eval(original: nn.Module, model_path: Path, batches: Sequence[np.ndarray]) -> Agreement:
    session = _session(model_path)
    agreement = Agreement()
    reference = float64_reference(original, batches[0])
    for index, batch in enumerate(batches):
        expected = _flat_outputs(reference, batch)
        actual = session.run(None, {INPUT_NAME: batch})
        agreement.add(f"eval batch {index} (N={batch.shape[0]})", actual, expected)
    return agreement


def verify_train(
    original: nn.Module,
    train_path: Path,
    batches: Sequence[np.ndarray],
    plan: FoldPlan,
    output_count: int,
) -> Agreement:
    """train.onnx against torch with only its BN modules in train mode.

    The batch statistics are checked too, against the mean and biased
    variance of each BN's input captured by hooks on the torch side.
    """
    session = _session(train_path)
    agreement = Agreement()
    reference = float64_reference(original, batches[0])
    for module in reference.modules():
        if isinstance(module, _BatchNorm):
            module.train()
    for index, batch in enumerate(batches):
        if not _statistics_defined(batch):
            continue
        with _captured_batch_statistics(reference, plan) as statistics:
            expected = _flat_outputs(reference, batch)
        actual = session.run(None, {INPUT_NAME: batch})
        label = f"train batch {index} (N={batch.shape[0]})"
        agreement.add(label, actual[:output_count], expected)
        agreement.add(f"{label} batch statistics", actual[output_count:], statistics)
    return agreement


@contextmanager
def _captured_batch_statistics(model: nn.Module, plan: FoldPlan) -> Iterator[list[np.ndarray]]:
    """Record (mean, var) of each manifest layer's BN call input, in plan.layer_sites order."""
    captured: dict[str, list[np.ndarray]] = {}
    handles = []

    def hook(path: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            dims = [0, *range(2, x.dim())]
            captured.setdefault(path, []).extend(
                [x.mean(dim=dims).numpy(), x.var(dim=dims, unbiased=False).numpy()]
            )

        return record

    for path in dict.fromkeys(site.module_path for site in plan.layer_sites):
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook(path)))
    ordered: list[np.ndarray] = []
    try:
        yield ordered
    finally:
        for handle in handles:
            handle.remove()
    offsets: dict[str, int] = {}
    for site in plan.layer_sites:
        start = offsets.get(site.module_path, 0)
        ordered.extend(captured[site.module_path][start : start + 2])
        offsets[site.module_path] = start + 2


def _statistics_defined(batch: np.ndarray) -> bool:
    """torch's rule: more than one value per channel (N × spatial > 1); checked at N > 1."""
    return batch.shape[0] > 1


def _session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def float64_reference(original: nn.Module, probe_batch: np.ndarray) -> nn.Module:
    """The original model evaluated in float64: the exact map, not a second float32 rounding.

    Comparing float32 against float32 torch would double the rounding noise
    and, where the BN amplifies a cancellation (tiny running_var, large γ),
    blame the fold for torch's own error. Models that cannot run in float64
    (custom kernels) are compared in their own precision.
    """
    reference = copy.deepcopy(original).eval().double()
    try:
        _flat_outputs(reference, probe_batch)
    except Exception:  # any failure in float64 means: compare in the model's own precision
        return copy.deepcopy(original).eval()
    return reference


def _flat_outputs(module: nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    with torch.no_grad():
        result = module(torch.from_numpy(batch).to(dtype))
    tensors = list(result) if isinstance(result, (tuple, list)) else [result]
    return [tensor.detach().numpy() for tensor in tensors]


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


def _tensor_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    session = _session(model_path)

    def spec(node: onnxruntime.NodeArg) -> TensorSpec:
        dtype = np.dtype(_ORT_TYPES[node.type])
        shape = [dim if isinstance(dim, int) else -1 for dim in node.shape]
        return TensorSpec(node.name, V2_DATATYPES[dtype], shape)

    return [spec(n) for n in session.get_inputs()], [spec(n) for n in session.get_outputs()]


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _random_batch(input_shape: Sequence[int], *, batch: int, seed: int) -> torch.Tensor:
    generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.standard_normal((batch, *input_shape[1:])).astype(np.float32))


def _verification_batch_sizes(input_shape: Sequence[int]) -> tuple[int, ...]:
    per_sample = math.prod(input_shape[1:])
    return (
        SMALL_INPUT_BATCH_SIZES if per_sample <= LARGE_INPUT_ELEMENTS else LARGE_INPUT_BATCH_SIZES
    )


def _verification_batches(
    input_shape: Sequence[int], sample: np.ndarray | None
) -> list[np.ndarray]:
    batches = [
        _random_batch(input_shape, batch=size, seed=VERIFY_SEED + size).numpy()
        for size in _verification_batch_sizes(input_shape)
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
