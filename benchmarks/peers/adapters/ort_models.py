"""What every peer adapter serves: the latest version of each package's model.onnx in a
bnfold repository, opened with the session options `bnfold serve` uses.

Runs inside the peers' virtualenvs, where bnfold is not installed: the options are spelt
out here, and must follow `_options` in service/sessions.py (full graph optimisation,
sequential execution, the memory arena on, no spinning); the intra-op thread count is
passed in by the benchmark, which reads bnfold's own (`Settings.session_threads`), so
every server runs the same graph the same way and only the serving around it differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnxruntime as ort


def model_paths(repository: Path) -> dict[str, Path]:
    """Model name -> the model.onnx of its highest numbered version."""
    paths = {}
    for model in sorted(path for path in repository.iterdir() if path.is_dir()):
        versions = [path for path in model.iterdir() if path.name.isdigit()]
        if versions:
            paths[model.name] = max(versions, key=lambda path: int(path.name)) / "model.onnx"
    return paths


def open_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.log_severity_level = 3
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def arguments(description: str, *numbers: str, folders: tuple[str, ...] = ()) -> argparse.Namespace:
    """The command line every adapter takes: the repository, the threads, and its own
    numbers (ports, batching) and folders."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    for number in numbers:
        parser.add_argument(f"--{number}", type=int, required=True)
    for folder in folders:
        parser.add_argument(f"--{folder}", type=Path, required=True)
    return parser.parse_args()
