"""Choosing onnxruntime execution providers for `--device auto|cpu|cuda`.

`select_providers` is the decision, a pure function of the device setting, the
providers this onnxruntime build offers and whether a GPU answered. The CUDA
provider is listed by every onnxruntime-gpu build, GPU or not, so "available"
is not enough: `cuda_usable` opens a one-node session on it and checks that
onnxruntime kept it (it silently falls back to CPU otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnxruntime as ort

from bnfold.service.errors import DeviceUnavailable
from bnfold.service.settings import Device

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

logger = logging.getLogger("bnfold.service")


def select_providers(
    device: Device, available: Sequence[str], *, gpu_usable: bool
) -> tuple[str, ...]:
    """The providers to open sessions with, in priority order; CPU is always the fallback.

    Raises `DeviceUnavailable` when `cuda` is asked for and cannot be had.
    """
    if device is Device.CPU:
        return (CPU,)
    cuda_ready = CUDA in available and gpu_usable
    if device is Device.CUDA:
        if CUDA not in available:
            raise DeviceUnavailable(
                "--device cuda: this onnxruntime build has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu instead of "
                "onnxruntime, or use --device auto/cpu"
            )
        if not gpu_usable:
            raise DeviceUnavailable(
                "--device cuda: onnxruntime-gpu is installed but no usable GPU answered "
                "(driver, CUDA/cuDNN libraries or CUDA_VISIBLE_DEVICES?); use --device auto/cpu"
            )
        return (CUDA, CPU)
    return (CUDA, CPU) if cuda_ready else (CPU,)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper  # only for the CUDA probe: a CPU server never needs onnx

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def cuda_usable() -> bool:
    """Whether a session on the CUDA provider really keeps it (a GPU and its libraries)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(_probe_model(), options, providers=[CUDA, CPU])
    except Exception as exc:  # onnxruntime raises several unrelated types here
        logger.debug("CUDA probe failed: %s", exc)
        return False
    return CUDA in session.get_providers()


def resolve_providers(device: Device) -> tuple[str, ...]:
    """`select_providers` on this machine: what onnxruntime offers, and a GPU probe if relevant."""
    available = ort.get_available_providers()
    gpu = device is not Device.CPU and CUDA in available and cuda_usable()
    return select_providers(device, available, gpu_usable=gpu)
