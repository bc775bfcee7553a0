"""MLServer serving the repository's model.onnx files through mlserver_runtime.py: writes
MLServer's settings.json and one model-settings.json a model into `--workdir`, then
becomes `mlserver start WORKDIR` (exec: the benchmark's process is MLServer's).

MLServer's defaults are kept (one parallel inference worker process, adaptive batching
off) except: every listener on 127.0.0.1 on the ports given, and `debug` off (no access
log, as `bnfold serve` runs in the benchmark).

    python mlserver_server.py --repository REPO --threads 2 --workdir DIR \
        --http-port 8080 --grpc-port 8081 --metrics-port 8082
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ort_models import arguments, model_paths

ADAPTERS = Path(__file__).resolve().parent


def write_settings(workdir: Path, repository: Path, threads: int, ports: dict[str, int]) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = {"host": "127.0.0.1", "debug": False, **ports}
    (workdir / "settings.json").write_text(json.dumps(server, indent=1))
    for name, path in model_paths(repository).items():
        (workdir / name).mkdir()
        model = {
            "name": name,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "parameters": {"uri": str(path.resolve()), "extra": {"threads": threads}},
        }
        (workdir / name / "model-settings.json").write_text(json.dumps(model, indent=1))


def main() -> None:
    options = arguments(
        __doc__.splitlines()[0], "http-port", "grpc-port", "metrics-port", folders=("workdir",)
    )
    ports = {
        "http_port": options.http_port,
        "grpc_port": options.grpc_port,
        "metrics_port": options.metrics_port,
    }
    write_settings(options.workdir, options.repository, options.threads, ports)
    mlserver = Path(sys.executable).parent / "mlserver"
    environment = {**os.environ, "PYTHONPATH": str(ADAPTERS)}
    os.execve(mlserver, [str(mlserver), "start", str(options.workdir)], environment)


if __name__ == "__main__":
    main()
