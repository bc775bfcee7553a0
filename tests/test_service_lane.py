"""The inference lane (service/rest/lane.py) and what stays with FastAPI's router.

A real server whose app is the bnfold app mounted under a prefix in a Starlette app
(what embedding it does): there the scope carries a root path, the lane steps aside,
and the router answers infer with the same result as the lane does at the top level.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from bnfold.service.rest.app import create_app
from bnfold.service.settings import Settings

from service_packages import MLP_SEEDS, mlp_reference, mlp_weights, write_mlp
from service_server import running_server


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repository = tmp_path_factory.mktemp("lane") / "repository"
    write_mlp(repository, "mlp", 1, MLP_SEEDS[1])
    bnfold = create_app(Settings(repository=repository, device="cpu"))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[Any]:
        async with bnfold.router.lifespan_context(bnfold) as state:  # bnfold's own start-up
            yield state

    outer = Starlette(routes=[Mount("/prefix", app=bnfold)], lifespan=lifespan)
    config = uvicorn.Config(outer, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def test_infer_under_a_mount_goes_through_the_router(mounted: str) -> None:
    batch = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    body = {
        "inputs": [{"name": "input", "shape": [3, 8], "datatype": "FP32", "data": batch.tolist()}]
    }
    with httpx.Client(base_url=mounted, timeout=30) as client:
        response = client.post(
            "/prefix/v2/models/mlp/infer", json=body, headers={"X-Request-ID": "m-1"}
        )
        missing = client.post("/prefix/v2/models/nope/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "m-1"
    [output] = response.json()["outputs"]
    expected = mlp_reference(mlp_weights(MLP_SEEDS[1]), batch)["eval"]
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(3, -1), expected, atol=1e-4)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_the_lane_answers_at_the_top_level_with_the_same_errors(tmp_path: Path) -> None:
    write_mlp(tmp_path / "repository", "mlp", 1, MLP_SEEDS[1])
    settings = Settings(repository=tmp_path / "repository", device="cpu")
    with (
        running_server(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        missing = client.post("/v2/models/nope/infer", json={"inputs": []})
        bad = client.post("/v2/models/mlp/infer", content=b"{", headers={"X-Request-ID": "b-1"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "b-1"
    assert bad.json()["request_id"] == "b-1"
