"""Shared helpers for converter tests: calibrated torch models and conversion in-process."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.convert.report import ConversionResult
from bnfold.convert.torch.pipeline import TorchConversionRequest, convert_torch
from bnfold.convert.torch.sources import LoadedSource


def calibrated(model: nn.Module, shape: tuple[int, ...], *, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial γ, β and running statistics, then switch to eval.

    Default BN parameters (γ=1, β=0, μ=0, σ²=1) would make a wrong fold look
    right; random ones make every term of the formula matter.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.affine:
            with torch.no_grad():
                module.weight.copy_(
                    torch.rand(module.weight.shape, generator=generator) * 1.5 + 0.5
                )
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 2 - 1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, generator=generator) * 2 + 0.5)
    return model.eval()


def convert_module(
    module: nn.Module,
    input_shape: tuple[int, ...],
    repository: Path,
    *,
    name: str = "net",
    sample: np.ndarray | None = None,
) -> ConversionResult:
    loaded = LoadedSource(module, "factory", f"test:{name}", name, input_shape, "0" * 64)
    request = TorchConversionRequest(loaded=loaded, repository=repository, sample=sample)
    return convert_torch(request)


def onnx_op_count(path: Path | str, op_type: str) -> int:
    model = onnx.load(str(path))
    return sum(node.op_type == op_type for node in model.graph.node)


def run_onnx(path: Path | str, batch: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})


def torch_eval(module: nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(module).eval()(torch.from_numpy(batch)).numpy()


def torch_train_mode_bn(module: nn.Module, batch: np.ndarray) -> np.ndarray:
    """Only BN in train mode (batch statistics), on a copy so no statistic changes."""
    reference = copy.deepcopy(module).eval()
    for child in reference.modules():
        if isinstance(child, _BatchNorm):
            child.train()
    with torch.no_grad():
        return reference(torch.from_numpy(batch)).numpy()


def manifest(result: ConversionResult) -> dict:
    return json.loads((Path(result.package_path) / "manifest.json").read_text())


def within_float32_tolerance(actual: np.ndarray, expected: np.ndarray) -> bool:
    """The converter's own rule, |a − b| ≤ 1e-5 + 1e-4·|b|, checked independently here."""
    return bool(np.all(np.abs(actual - expected) <= 1e-5 + 1e-4 * np.abs(expected)))
