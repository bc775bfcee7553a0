"""PyTriton serving the repository's model.onnx files, written from PyTriton's documented
API: `Triton(config=TritonConfig(...))`, one `bind` a model with an `@batch` inference
function and `ModelConfig(max_batch_size, batcher=DynamicBatcher(...))`, then `serve()`.
Triton's own C++ server answers HTTP and gRPC; the functions run in this process.

The batcher gets bnfold's batching defaults (`--max-batch-size`, `--max-queue-delay-us`,
passed in), every listener 127.0.0.1 on the ports given. One fix: the Python backend
stub that the wheel bundles links libpython from the library path (none there, or the
system's rather than this interpreter's), so the interpreter's own library directory is
put first on LD_LIBRARY_PATH before Triton starts it.

    python pytriton_server.py --repository REPO --threads 2 --max-batch-size 32 \
        --max-queue-delay-us 0 --http-port 8000 --grpc-port 8001 --metrics-port 8002
"""

from __future__ import annotations

import os
import signal
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ort_models import arguments, model_paths, open_session
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DTYPES = {"tensor(float)": np.float32}


def infer_function(session) -> Callable:
    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(None, inputs)
        return {meta.name: value for meta, value in zip(session.get_outputs(), values, strict=True)}

    return infer


def tensors(metas) -> list[Tensor]:
    """Triton's tensors: the shape without the batch dimension, which Triton batches on."""
    return [
        Tensor(name=meta.name, dtype=DTYPES[meta.type], shape=tuple(meta.shape[1:]))
        for meta in metas
    ]


def main() -> None:
    options = arguments(
        __doc__.splitlines()[0],
        "max-batch-size",
        "max-queue-delay-us",
        "http-port",
        "grpc-port",
        "metrics-port",
    )
    library = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [library, os.environ.get("LD_LIBRARY_PATH")])
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # serve() stops on it
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=options.http_port,
        grpc_address="127.0.0.1",
        grpc_port=options.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=options.metrics_port,
        log_verbose=0,
    )
    batcher = DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)
    with Triton(config=config) as triton:
        for name, path in model_paths(Path(options.repository)).items():
            session = open_session(path, options.threads)
            triton.bind(
                model_name=name,
                infer_func=infer_function(session),
                inputs=tensors(session.get_inputs()),
                outputs=tensors(session.get_outputs()),
                config=ModelConfig(max_batch_size=options.max_batch_size, batcher=batcher),
                strict=False,
            )
        triton.serve()


if __name__ == "__main__":
    main()
