"""The baseline: a FastAPI + onnxruntime JSON server as a user writes it in an afternoon.

Deliberately ordinary, not a straw man: pydantic request models, `np.array` on
the parsed list, a plain `def` handler (FastAPI runs it in its thread pool),
the response returned as a dict (FastAPI's `jsonable_encoder` and `json`).
onnxruntime with its default session options. It speaks the V2 JSON request
and response shape for the first input and every output, so the benchmark
sends the same bodies to it as to bnfold.

    python benchmarks/baseline_server.py --repository REPO --port 8001
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


def create_app(repository: Path) -> FastAPI:
    sessions = {}
    for model_dir in sorted(repository.iterdir()):
        versions = sorted(
            (path for path in model_dir.iterdir() if path.name.isdigit()),
            key=lambda path: int(path.name),
        )
        if versions:
            sessions[model_dir.name] = ort.InferenceSession(
                str(versions[-1] / "model.onnx"), providers=["CPUExecutionProvider"]
            )
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer")
    def infer(model_name: str, request: InferRequest) -> dict:
        if model_name not in sessions:
            raise HTTPException(404, f"unknown model {model_name}")
        session = sessions[model_name]
        feeds = {
            tensor.name: np.array(tensor.data, dtype=np.float32).reshape(tensor.shape)
            for tensor in request.inputs
        }
        names = [output.name for output in session.get_outputs()]
        outputs = session.run(names, feeds)
        return {
            "model_name": model_name,
            "outputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "data": array.flatten().tolist(),
                }
                for name, array in zip(names, outputs, strict=True)
            ],
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    arguments = parser.parse_args()
    uvicorn.run(
        create_app(arguments.repository),
        host="127.0.0.1",
        port=arguments.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
