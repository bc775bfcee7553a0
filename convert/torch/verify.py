"""Verifying a torch conversion: model.onnx and train.onnx in onnxruntime against torch.

* model.onnx against the original module in eval mode, run in float64
  (`float64_reference`: the exact map, not a second float32 rounding).
* train.onnx against the original with only its BatchNorm modules in train
  mode (Dropout stays off, as in train.onnx), outputs and each manifest
  layer's batch mean and biased variance, captured by hooks on the BN inputs.
* calibration.onnx, fed the input alone, against the original in eval mode
  (float64), outputs and each manifest layer's input mean, biased variance
  and count, captured by the same hooks.

Judged by `convert.verify.Agreement`, the rule both paths share.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.onnx.verify import session
from bnfold.convert.torch.graph import FoldPlan
from bnfold.convert.verify import Agreement

INPUT_NAME = "input"


def verify_eval(original: nn.Module, model_path: Path, batches: Sequence[np.ndarray]) -> Agreement:
    folded = session(model_path, optimized=True)
    agreement = Agreement()
    reference = float64_reference(original, batches[0])
    for index, batch in enumerate(batches):
        expected = _flat_outputs(reference, batch)
        actual = folded.run(None, {INPUT_NAME: batch})
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
    train = session(train_path, optimized=True)
    agreement = Agreement()
    reference = float64_reference(original, batches[0])
    for module in reference.modules():
        if isinstance(module, _BatchNorm):
            module.train()
    for index, batch in enumerate(batches):
        if not _statistics_defined(batch):
            continue
        with _captured_input_statistics(reference, plan) as statistics:
            expected = _flat_outputs(reference, batch)
        actual = train.run(None, {INPUT_NAME: batch})
        label = f"train batch {index} (N={batch.shape[0]})"
        agreement.add(label, actual[:output_count], expected)
        batch_statistics = [value for layer in statistics for value in layer[:2]]
        agreement.add(f"{label} batch statistics", actual[output_count:], batch_statistics)
    return agreement


def verify_calibration(
    original: nn.Module, calibration_path: Path, batches: Sequence[np.ndarray], plan: FoldPlan
) -> Agreement:
    """calibration.onnx fed the input alone (running statistics at their defaults) against
    torch in eval mode: outputs, then each layer's input mean, biased variance and count."""
    calibration = session(calibration_path, optimized=True)
    agreement = Agreement()
    reference = float64_reference(original, batches[0])
    for index, batch in enumerate(batches):
        with _captured_input_statistics(reference, plan) as statistics:
            expected = _flat_outputs(reference, batch)
        actual = calibration.run(None, {INPUT_NAME: batch})
        expected.extend(value for layer in statistics for value in layer)
        agreement.add(f"calibration batch {index} (N={batch.shape[0]})", actual, expected)
    return agreement


#: One BN call's input: per-channel mean and biased variance (float64 [C]), values per channel.
InputStatistics = tuple[np.ndarray, np.ndarray, np.ndarray]


@contextmanager
def _captured_input_statistics(model: nn.Module, plan: FoldPlan) -> Iterator[list[InputStatistics]]:
    """Record the statistics of each manifest layer's BN call input, in plan.layer_sites order
    (a module called at several sites: its calls in order)."""
    captured: dict[str, list[InputStatistics]] = {}
    handles = []

    def hook(path: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            dims = [0, *range(2, x.dim())]
            captured.setdefault(path, []).append(
                (
                    x.mean(dim=dims).numpy(),
                    x.var(dim=dims, unbiased=False).numpy(),
                    np.array(x.numel() // x.shape[1], np.int64),
                )
            )

        return record

    for path in dict.fromkeys(site.module_path for site in plan.layer_sites):
        assert path is not None
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook(path)))
    ordered: list[InputStatistics] = []
    try:
        yield ordered
    finally:
        for handle in handles:
            handle.remove()
    calls: dict[str, int] = {}
    for site in plan.layer_sites:
        assert site.module_path is not None
        call = calls.get(site.module_path, 0)
        ordered.append(captured[site.module_path][call])
        calls[site.module_path] = call + 1


def _statistics_defined(batch: np.ndarray) -> bool:
    """torch's rule: more than one value per channel (N × spatial > 1); checked at N > 1."""
    return batch.shape[0] > 1


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
