"""The CUDA execution provider, on a machine that has onnxruntime-gpu and a GPU (skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bnfold.service.providers import CUDA, cuda_usable
from bnfold.service.settings import Settings

from service_server import running_server

pytestmark = pytest.mark.skipif(
    CUDA not in ort.get_available_providers() or not cuda_usable(),
    reason="needs onnxruntime-gpu and a usable GPU",
)


def _infer(url: str, batch: np.ndarray) -> np.ndarray:
    request = {
        "inputs": [
            {
                "name": "input",
                "shape": list(batch.shape),
                "datatype": "FP32",
                "data": batch.tolist(),
            }
        ]
    }
    response = httpx.post(f"{url}/v2/models/mlp/infer", json=request, timeout=30)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cuda_serves_and_agrees_with_cpu(
    service_repository: Path, tmp_path: Path, device: str
) -> None:
    batch = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    with running_server(Settings(repository=service_repository, device="cpu")) as cpu:
        on_cpu = _infer(cpu.url, batch)
    with running_server(Settings(repository=service_repository, device=device)) as gpu:
        metadata = httpx.get(f"{gpu.url}/v2/models/mlp").json()
        assert metadata["parameters"]["execution_providers"][0] == CUDA
        assert (
            httpx.get(f"{gpu.url}/v2/models/mlp/config").json()["instance_group"][0]["kind"]
            == "KIND_GPU"
        )
        on_gpu = _infer(gpu.url, batch)
        compare = httpx.post(
            f"{gpu.url}/v2/models/mlp/compare",
            json={
                "inputs": [
                    {"name": "input", "shape": [64, 8], "datatype": "FP32", "data": batch.tolist()}
                ]
            },
            timeout=30,
        )
        assert compare.status_code == 200
    # cuBLAS may round through TF32 (10-bit mantissa, ~1e-3 relative) and sums in
    # another order than the CPU: agreement to 5e-3 of the output scale.
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=0, atol=5e-3 * float(np.abs(on_cpu).max()))
