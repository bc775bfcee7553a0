"""The anchor and the references, in torch, on the original (unfolded) model.

* `update_bn`: torch.optim.swa_utils.update_bn, the anchor bnfold must match or beat.
  It resets the statistics, runs the whole model in train mode (Dropout included)
  and averages the per-batch means and unbiased variances (momentum=None), so its
  variance misses the spread of the batch means and every BN is estimated on
  inputs normalised with batch statistics, not with what eval mode will use.
* `exact_sequential`: what `bnfold recalibrate --method sequential` promises, computed
  independently here: each BN, in execution order, gets the population mean and
  unbiased variance of its eval-mode input with every earlier BN already updated.
* `precise_batch`: what `--method batch` promises: BNs in train mode, Dropout off,
  the batch statistics pooled exactly over all samples.

The two references only explain a row: when bnfold's predictions equal its
reference's, bnfold computed what it promises, and a gap to the anchor is the
method's, not an error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn
from torch.utils.data import DataLoader, TensorDataset

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def predictions(model: nn.Module, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Eval-mode class predictions."""
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).argmax(1).numpy()


def loader(inputs: npt.NDArray[np.float32], batch_size: int) -> DataLoader:
    """In order, the last batch smaller: the batches bnfold is given with --batch-size."""
    return DataLoader(TensorDataset(torch.from_numpy(inputs)), batch_size=batch_size)


def update_bn(
    model: nn.Module, inputs: npt.NDArray[np.float32], batch_size: int, seed: int = 0
) -> nn.Module:
    """A copy of `model` after torch.optim.swa_utils.update_bn on `inputs`, in eval mode.

    Seeded because the train mode it runs in turns Dropout on."""
    updated = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch_update_bn(loader(inputs, batch_size), updated)
    return updated.eval()


def _batchnorms_in_execution_order(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    order: list[nn.Module] = []
    handles = [
        module.register_forward_pre_hook(lambda module, _: order.append(module))
        for module in model.modules()
        if isinstance(module, _BATCHNORMS)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


class _Pooled:
    """Exact per-channel sums over N and the spatial axes, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | float = 0.0
        self.squares: torch.Tensor | float = 0.0

    def add(self, batch: torch.Tensor) -> None:
        channels_first = batch.detach().double().transpose(0, 1).reshape(batch.shape[1], -1)
        self.count += channels_first.shape[1]
        self.total = self.total + channels_first.sum(1)
        self.squares = self.squares + (channels_first**2).sum(1)

    def set_statistics(self, batchnorm: nn.Module) -> None:
        mean = self.total / self.count
        variance = (self.squares - self.count * mean**2) / (self.count - 1)
        batchnorm.running_mean.copy_(mean.float())
        batchnorm.running_var.copy_(variance.float())


@contextmanager
def _pooling(batchnorms: list[nn.Module]) -> Iterator[list[_Pooled]]:
    pools = [_Pooled() for _ in batchnorms]
    handles = [
        batchnorm.register_forward_pre_hook(lambda _, args, pool=pool: pool.add(args[0]))
        for batchnorm, pool in zip(batchnorms, pools, strict=True)
    ]
    try:
        yield pools
    finally:
        for handle in handles:
            handle.remove()


def exact_sequential(
    model: nn.Module, inputs: npt.NDArray[np.float32], batch_size: int
) -> nn.Module:
    """A copy of `model` with bnfold's `sequential` statistics, one BN at a time."""
    updated = copy.deepcopy(model).eval()
    data = loader(inputs, batch_size)
    for batchnorm in _batchnorms_in_execution_order(updated, torch.from_numpy(inputs[:2])):
        with torch.no_grad(), _pooling([batchnorm]) as [pool]:
            for (batch,) in data:
                updated(batch)
        pool.set_statistics(batchnorm)
    return updated


def precise_batch(model: nn.Module, inputs: npt.NDArray[np.float32], batch_size: int) -> nn.Module:
    """A copy of `model` with bnfold's `batch` statistics: one train-mode pass, Dropout off."""
    updated = copy.deepcopy(model).train()
    for module in updated.modules():
        if isinstance(module, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d):
            module.eval()
    batchnorms = [module for module in updated.modules() if isinstance(module, _BATCHNORMS)]
    with torch.no_grad(), _pooling(batchnorms) as pools:
        for (batch,) in loader(inputs, batch_size):
            updated(batch)
    for batchnorm, pool in zip(batchnorms, pools, strict=True):
        pool.set_statistics(batchnorm)
    return updated.eval()
