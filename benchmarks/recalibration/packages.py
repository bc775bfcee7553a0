"""The benchmark's repository and `bnfold recalibrate`, driven through its command line.

Nothing here imports bnfold's recalibration code: the benchmark sees what a user
sees, the `--json` answer and the package it wrote, so it measures the command as
shipped and keeps working whatever the internals become.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime

from bnfold.package_format import EVAL_GRAPH

ROOT = Path(__file__).resolve().parent.parent.parent
WORK = ROOT / "benchmarks" / "out" / "recalibrate"
#: The .npy files given to `bnfold recalibrate --data`.
DATA = WORK / "data"
BNFOLD = [sys.executable, "-m", "bnfold"]
#: Longest a single recalibration may take before the run gives up on it.
RECALIBRATE_TIMEOUT_SECONDS = 900.0


class RecalibrateFailed(RuntimeError):
    """`bnfold recalibrate` exited non-zero; the message carries its stderr."""


def recalibrate_available() -> bool:
    """Whether this bnfold has the `recalibrate` command."""
    answer = subprocess.run(
        [*BNFOLD, "recalibrate", "--help"], cwd=ROOT, capture_output=True, check=False
    )
    return answer.returncode == 0


def build_repository(repository: Path, *, resnet18: bool) -> None:
    """A fresh repository: the built-in digits models (and ResNet-18 at its default
    input shape) converted by the converter of this checkout, version 1 each."""
    shutil.rmtree(repository, ignore_errors=True)
    repository.parent.mkdir(parents=True, exist_ok=True)
    quiet = {"cwd": ROOT, "check": True, "stdout": subprocess.DEVNULL}
    subprocess.run([*BNFOLD, "models", "build", "--repository", str(repository)], **quiet)
    if resnet18:
        subprocess.run([*BNFOLD, "convert", "resnet18", "--repository", str(repository)], **quiet)


def copy_version(source: Path, target: Path, names: list[str], version: int = 1) -> None:
    """`target`, fresh, holding only `version` of each of `names` from `source`."""
    shutil.rmtree(target, ignore_errors=True)
    for name in names:
        shutil.copytree(source / name / str(version), target / name / str(version))


def write_data(name: str, inputs: npt.NDArray[np.float32]) -> Path:
    """DATA/name.npy holding `inputs`: what `--data` reads."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.npy"
    np.save(path, inputs)
    return path


@dataclass
class Recalibration:
    """One `bnfold recalibrate` run: its `--json` answer and the process's wall time."""

    answer: dict
    wall_seconds: float

    @property
    def package(self) -> Path:
        return Path(self.answer["package_path"])

    @property
    def seconds(self) -> float:
        """The recalibration's own time, as the command reports it."""
        return float(self.answer["seconds"])


def recalibrate(
    repository: Path,
    name: str,
    data: Path,
    method: str,
    batch_size: int,
    *,
    version: int = 1,
    new_version: int | None = None,
) -> Recalibration:
    """Run `bnfold recalibrate REPO/NAME --version V --data DATA --json` and read its answer.

    `new_version` numbers the package written (default: the next integer); runs that
    may overlap on one model each need their own."""
    command = [
        *BNFOLD,
        "recalibrate",
        f"{repository}/{name}",
        "--version",
        str(version),
        "--data",
        str(data),
        "--method",
        method,
        "--batch-size",
        str(batch_size),
        "--json",
        "--no-progress",
    ]
    if new_version is not None:
        command += ["--new-version", str(new_version)]
    started = time.perf_counter()
    answer = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=RECALIBRATE_TIMEOUT_SECONDS,
    )
    wall = time.perf_counter() - started
    if answer.returncode != 0:
        raise RecalibrateFailed(
            f"{' '.join(command[2:])} exited with {answer.returncode}: {answer.stderr.strip()}"
        )
    return Recalibration(json.loads(answer.stdout), wall)


def onnx_predictions(
    package: Path, inputs: npt.NDArray[np.float32], threads: int = 2
) -> npt.NDArray[np.int64]:
    """Class predictions of a package's model.onnx (what the service would serve)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        str(package / EVAL_GRAPH), options, providers=["CPUExecutionProvider"]
    )
    [logits] = session.run(None, {session.get_inputs()[0].name: inputs})
    return logits.argmax(1)
