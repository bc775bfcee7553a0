"""The drift endpoint's verdict on shifted live traffic, before and after a roll-forward.

Per kind of traffic (clean, then each shift), a fresh repository holding version 1
of each model is served by `bnfold serve` with every request monitored; the
(shifted) held-out images go one per request; the verdict of version 1 is read;
then `bnfold recalibrate` writes version 2 beside the running server, the load
endpoint rolls unversioned requests forward, the same traffic goes again and the
verdict of version 2 is read. Clean traffic is the control: nothing should drift.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from rich.progress import Progress

from bnfold.models.data import DigitsSplit, digits_dataset
from bnfold.models.registry import builtin_model

from .packages import WORK, copy_version, recalibrate, write_data
from .results import DriftRow, DriftVerdict
from .shifts import SHIFTS, TEST_SEED, TRAIN_SEED, Shift
from serving.harness import WORK as SERVE_WORK
from serving.harness import bnfold_command, free_port, serve

REPOSITORY = WORK / "drift-repository"
#: Monitor every request: the verdict then covers exactly the traffic sent.
DRIFT_OPTIONS = ("--drift-sample-fraction", "1.0", "--drift-cpu-budget", "0")
#: The token goes by environment, not on a command line other users can read.
ADMIN_TOKEN_VARIABLE = "BNFOLD_ADMIN_TOKEN"
TIMEOUT_SECONDS = 60.0
#: Longest wait for the monitor (it measures off the request path) to catch up.
SETTLE_SECONDS = 30.0


class DriftUnavailable(RuntimeError):
    """The server has no drift endpoint, or does not monitor this package."""


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """`name=value` for the processes started inside (the server), restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _served_predictions(
    client: httpx.Client, model: str, version: int | None, inputs: np.ndarray
) -> tuple[np.ndarray, set[str]]:
    """One request per image (live traffic, batch 1), unversioned when `version` is None:
    the predictions and the versions that answered."""
    input_name = client.get(f"/v2/models/{model}").json()["inputs"][0]["name"]
    path = f"/v2/models/{model}" + ("" if version is None else f"/versions/{version}") + "/infer"
    predicted = []
    answered = set()
    for image in inputs:
        tensor = {
            "name": input_name,
            "shape": [1, *image.shape],
            "datatype": "FP32",
            "data": image.ravel().tolist(),
        }
        answer = client.post(path, json={"inputs": [tensor]})
        answer.raise_for_status()
        body = answer.json()
        answered.add(body["model_version"])
        predicted.append(int(np.argmax(body["outputs"][0]["data"])))
    return np.asarray(predicted), answered


def _settled_drift(client: httpx.Client, model: str, version: int, requests: int) -> dict:
    """The drift report once the monitor has accounted for `requests` (measured or
    dropped), or after `SETTLE_SECONDS`."""
    path = f"/v2/models/{model}/versions/{version}/drift"
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        answer = client.get(path)
        if answer.status_code == 404 and "drift" not in answer.text.lower():
            raise DriftUnavailable("this checkout's server has no drift endpoint")
        answer.raise_for_status()
        report = answer.json()
        if not report["available"]:
            raise DriftUnavailable(f"{model} version {version}: {report.get('reason')}")
        accounted = (report.get("requests_sampled") or 0) + (report.get("dropped") or 0)
        if accounted >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def _verdict(report: dict, version: int, served_accuracy: float) -> DriftVerdict:
    """What the report shows, from the endpoint's JSON (layers come worst first)."""
    layers = report.get("layers") or []
    worst = layers[0] if layers else {}
    return DriftVerdict(
        version=version,
        status=report["verdict"]["status"],
        samples_seen=int(report.get("samples") or 0),
        dropped=int(report.get("dropped") or 0),
        layers=int(report["verdict"]["layers"]),
        drifted=int(report["verdict"]["drifted_layers"]),
        worst_layer=str(worst.get("name", "—")),
        worst_kl=float(worst.get("kl_divergence", {}).get("mean", float("nan"))),
        worst_mean_shift=float(worst.get("mean_shift", {}).get("mean", float("nan"))),
        served_accuracy=served_accuracy,
    )


def drift_rows(
    repository: Path,
    models: list[str],
    batch_size: int,
    progress: Progress,
    *,
    roll_forward: bool,
) -> tuple[list[DriftRow], str | None]:
    """Every model under clean traffic and each shift; the second value says what could
    not be measured, if anything. Without `roll_forward` only version 1 is read."""
    split = digits_dataset()
    kinds = [None, *SHIFTS]
    task = progress.add_task("drift endpoint", total=len(kinds) * len(models))
    rows: list[DriftRow] = []
    SERVE_WORK.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    try:
        for shift in kinds:
            kind = "clean" if shift is None else shift.name
            copy_version(repository, REPOSITORY, models)
            port = free_port()
            command = bnfold_command(REPOSITORY, port, *DRIFT_OPTIONS)
            with (
                _environment(ADMIN_TOKEN_VARIABLE, token),
                serve(f"recalibration-drift-{kind}", command, port) as server,
                httpx.Client(base_url=server.url, timeout=TIMEOUT_SECONDS) as client,
            ):
                for name in models:
                    progress.update(task, description=f"drift endpoint: {name}, {kind} traffic")
                    rows.append(
                        _drift_row(client, token, name, shift, split, batch_size, roll_forward)
                    )
                    progress.advance(task)
    except DriftUnavailable as problem:
        return rows, f"the drift endpoint's verdicts: {problem}"
    return rows, None


def _drift_row(
    client: httpx.Client,
    token: str,
    name: str,
    shift: Shift | None,
    split: DigitsSplit,
    batch_size: int,
    roll_forward: bool,
) -> DriftRow:
    """One model: traffic, verdict; recalibrate, roll forward, the same traffic, verdict."""
    kind = "clean" if shift is None else shift.name
    spec = builtin_model(name)
    pixels = split.test_inputs if shift is None else shift(split.test_inputs, TEST_SEED)
    inputs = spec.digits_inputs(pixels)

    def served_accuracy(version: int | None, expected: int) -> float:
        predicted, answered = _served_predictions(client, name, version, inputs)
        if answered != {str(expected)}:
            raise RuntimeError(f"{name}: versions {answered} answered, expected {expected}")
        return float((predicted == split.test_labels).mean())

    accuracy = served_accuracy(1, 1)
    before = _verdict(_settled_drift(client, name, 1, len(inputs)), 1, accuracy)
    if shift is None or not roll_forward:
        return DriftRow(name, kind, before, None)
    data = write_data(
        f"{name}-{kind}-all", spec.digits_inputs(shift(split.train_inputs, TRAIN_SEED))
    )
    version = int(recalibrate(REPOSITORY, name, data, "sequential", batch_size).answer["version"])
    client.post(
        f"/v2/repository/models/{name}/load",
        headers={"Authorization": f"Bearer {token}"},
        json={},
    ).raise_for_status()
    accuracy = served_accuracy(None, version)
    after = _verdict(_settled_drift(client, name, version, len(inputs)), version, accuracy)
    return DriftRow(name, kind, before, after)
