"""A server killed in the middle of a recalibration leaves no partial version.

`bnfold serve` runs as a real process; the recalibrate request is sent, and the whole
process group gets SIGKILL as soon as the new version's staging directory appears in the
repository (the package is being written). Afterwards no version directory exists but
the old one, a fresh server serves version 1 only, and the next recalibration succeeds.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bnfold.models.data import digits_dataset
from bnfold.models.registry import builtin_model
from reliability.harness import server_process

from service_server import ADMIN_TOKEN

MODEL = "digits_resnet"
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/x-npy"}
ENV = {"BNFOLD_ADMIN_TOKEN": ADMIN_TOKEN}
WATCH_SECONDS = 120.0


def _calibration_body() -> bytes:
    pixels = digits_dataset().train_inputs * 0.3
    buffer = io.BytesIO()
    np.save(buffer, builtin_model(MODEL).digits_inputs(pixels.astype(np.float32)))
    return buffer.getvalue()


def _versions(repository: Path) -> list[str]:
    return sorted(path.name for path in (repository / MODEL).iterdir())


def test_killed_while_writing_the_new_version_leaves_none(
    digits_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(digits_repository / MODEL, repository / MODEL)
    body = _calibration_body()
    url = f"/v2/repository/models/{MODEL}/recalibrate"
    with server_process(repository, env=ENV) as server:

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
                httpx.post(server.url + url, content=body, headers=HEADERS, timeout=WATCH_SECONDS)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + WATCH_SECONDS
        staging: list[Path] = []
        while not staging and time.monotonic() < deadline:
            staging = [path for path in repository.iterdir() if path.name.startswith(".")]
            time.sleep(0.001)
        os.killpg(server.pid, signal.SIGKILL)
        sender.join(timeout=30)
    assert staging, "the recalibration never started writing"
    assert _versions(repository) == ["1"]

    with server_process(repository, env=ENV) as server:
        index = httpx.post(server.url + "/v2/repository/index").json()
        assert [(entry["version"], entry["state"]) for entry in index] == [("1", "READY")]
        response = httpx.post(server.url + url, content=body, headers=HEADERS, timeout=120)
        assert response.status_code == 200, response.text
    assert _versions(repository) == ["1", "2"]
    assert not [path for path in repository.iterdir() if path.name.startswith(".")]
