"""Execution provider selection: the pure decision, and what this machine really offers."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from bnfold.service.errors import DeviceUnavailable
from bnfold.service.providers import CPU, CUDA, cuda_usable, resolve_providers, select_providers
from bnfold.service.settings import Device

GPU_BUILD = ["TensorrtExecutionProvider", CUDA, CPU]
CPU_BUILD = ["AzureExecutionProvider", CPU]


def test_cpu_is_cpu_whatever_is_installed() -> None:
    assert select_providers(Device.CPU, GPU_BUILD, gpu_usable=True) == (CPU,)
    assert select_providers(Device.CPU, CPU_BUILD, gpu_usable=False) == (CPU,)


def test_auto_takes_cuda_only_with_the_build_and_a_gpu() -> None:
    assert select_providers(Device.AUTO, GPU_BUILD, gpu_usable=True) == (CUDA, CPU)
    assert select_providers(Device.AUTO, GPU_BUILD, gpu_usable=False) == (CPU,)
    assert select_providers(Device.AUTO, CPU_BUILD, gpu_usable=False) == (CPU,)


def test_cuda_fails_with_a_reason_when_it_cannot_be_had() -> None:
    assert select_providers(Device.CUDA, GPU_BUILD, gpu_usable=True) == (CUDA, CPU)
    with pytest.raises(DeviceUnavailable, match="install onnxruntime-gpu"):
        select_providers(Device.CUDA, CPU_BUILD, gpu_usable=False)
    with pytest.raises(DeviceUnavailable, match="no usable GPU"):
        select_providers(Device.CUDA, GPU_BUILD, gpu_usable=False)


def test_this_machine() -> None:
    """What onnxruntime really reports here: CPU always, CUDA only with onnxruntime-gpu + GPU."""
    available = ort.get_available_providers()
    assert CPU in available
    assert resolve_providers(Device.CPU) == (CPU,)
    gpu = CUDA in available and cuda_usable()
    assert resolve_providers(Device.AUTO) == ((CUDA, CPU) if gpu else (CPU,))
    if gpu:
        assert resolve_providers(Device.CUDA) == (CUDA, CPU)
    else:
        with pytest.raises(DeviceUnavailable):
            resolve_providers(Device.CUDA)
