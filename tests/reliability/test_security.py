"""Security: the admin token, the body limit, the repository boundary, the converter's files.

* Admin endpoints (load, unload) are off (403) without a configured token,
  refuse (401, `WWW-Authenticate: Bearer`) a missing or wrong bearer token, and
  compare tokens with `hmac.compare_digest` (constant time).
* The body limit holds for chunked uploads: the server answers 413 once the
  limit is passed, without waiting for the rest of an endless upload.
* No request reaches a file outside the repository: a valid package placed next
  to the repository cannot be served, indexed or loaded through any spelling of
  `..`, `/`, `%2e%2e`, `%2f`, NUL or backslash (the request-level cases of
  model names are in test_hostile_inputs.py).
* `bnfold convert` killed with SIGKILL in the middle of a real conversion leaves
  no package behind; the next conversion clears its staging directory. (Pickles
  without `--trust-pickle`: tests/test_convert_cli.py::test_pickled_model_needs_trust_pickle;
  Ctrl-C: test_ctrl_c_during_conversion_writes_nothing.)
"""

from __future__ import annotations

import hmac
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from bnfold.service.repository import scan_repository
from bnfold.service.settings import Settings

from .harness import raw_request
from service_packages import write_mlp
from service_server import ADMIN_TOKEN, RunningServer, running_server

# ---------------------------------------------------------------- admin token


def test_admin_endpoints_are_off_without_a_token(reliability_repository: Path) -> None:
    for token in (None, "", "   "):
        settings = Settings(repository=reliability_repository, device="cpu", admin_token=token)
        with running_server(settings) as server:
            for action in ("load", "unload"):
                for headers in ({}, {"Authorization": "Basic x"}, {"Authorization": "Bearer x"}):
                    response = httpx.post(
                        f"{server.url}/v2/repository/models/mlp/{action}", headers=headers
                    )
                    assert response.status_code == 403, response.text
                    assert "admin endpoints are disabled" in response.json()["error"]
            assert httpx.get(f"{server.url}/v2/models/mlp/ready").status_code == 200


BAD_TOKENS = [
    None,
    "",
    "Bearer",
    f"Basic {ADMIN_TOKEN}",
    f"Bearer {ADMIN_TOKEN[:-1]}",
    f"Bearer {ADMIN_TOKEN}x",
    f"Bearer x{ADMIN_TOKEN[1:]}",
    f"Bearer {ADMIN_TOKEN.upper()}",
    "Bearer " + "a" * 10_000,
    "Bearer é",
]


@pytest.mark.parametrize("authorization", BAD_TOKENS, ids=range(len(BAD_TOKENS)))
def test_missing_or_wrong_tokens_are_refused(
    reliability_service: RunningServer, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for action in ("load", "unload"):
        response = httpx.post(
            f"{reliability_service.url}/v2/repository/models/mlp/{action}",
            headers={name: value.encode() for name, value in headers.items()},
        )
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
    ready = httpx.get(f"{reliability_service.url}/v2/models/mlp/ready")
    assert ready.status_code == 200, "a refused unload unloaded the model"


def test_tokens_are_compared_in_constant_time(
    reliability_service: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every candidate token goes through hmac.compare_digest, whatever its length."""
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return original(given, expected)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for candidate in ("x", ADMIN_TOKEN[:-1] + "?", ADMIN_TOKEN + "x" * 100):
        response = httpx.post(
            f"{reliability_service.url}/v2/repository/models/no_such_model/unload",
            headers={"Authorization": f"Bearer {candidate}"},
        )
        assert response.status_code == 401
    assert compared == [
        (candidate.encode(), ADMIN_TOKEN.encode())
        for candidate in ("x", ADMIN_TOKEN[:-1] + "?", ADMIN_TOKEN + "x" * 100)
    ]


# ---------------------------------------------------------------- body limit

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def limited_service(reliability_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(repository=reliability_repository, device="cpu", max_body_bytes=LIMIT)
    with running_server(settings) as server:
        yield server


@pytest.mark.parametrize("endpoint", ["/v2/models/mlp/infer", "/v2/models/mlp/compare",
                                      "/v2/repository/index"])  # fmt: skip
def test_an_endless_chunked_upload_is_cut_at_the_limit(
    limited_service: RunningServer, endpoint: str
) -> None:
    """Chunks of 8 KiB for up to 64 MiB: the 413 arrives within a few chunks past the limit."""
    chunk = b" " * 8192
    sent = 0
    with socket.create_connection(("127.0.0.1", limited_service.port), timeout=10) as connection:
        connection.sendall(
            f"POST {endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\n\r\n".encode()
        )
        reply = b""
        deadline = time.monotonic() + 30
        while sent < 64 * 2**20 and time.monotonic() < deadline:
            # paced at about 8 MB/s, so the answer is seen soon after it is sent
            readable, _, _ = select.select([connection], [], [], 0.001)
            if readable:
                reply = connection.recv(65536)
                break
            try:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                reply = connection.recv(65536)
                break
            sent += len(chunk)
        else:
            pytest.fail(f"no answer after {sent} bytes")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert f"over the {LIMIT}-byte limit".encode() in reply
    print(f"FIGURE chunked upload to {endpoint}: 413 after {sent} bytes sent (limit {LIMIT})")
    assert sent < LIMIT + 1024 * 1024  # socket buffers in between, never the whole upload


# ---------------------------------------------------------------- the repository boundary


@pytest.fixture(scope="module")
def fenced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A repository with `mlp`, and a valid package `outside` next to it (not in it)."""
    root = tmp_path_factory.mktemp("fenced")
    repository = root / "repository"
    write_mlp(repository, "mlp", 1, seed=1)
    write_mlp(root, "outside", 1, seed=2)  # root/outside/1: a sibling of the repository
    write_mlp(root / "repository" / ".." / "..", "far_outside", 1, seed=3)
    settings = Settings(repository=repository, device="cpu", admin_token=ADMIN_TOKEN)
    with running_server(settings) as server:
        yield server


ESCAPES = [
    "..%2foutside",
    "%2e%2e%2foutside",
    "%2E%2E%2Foutside",
    "..%5coutside",
    "..%2f..%2ffar_outside",
    "....%2f%2foutside",
    "%2e%2e/outside",
    "../outside",
    "..",
    "%2e%2e",
    ".",
    "%00",
    "mlp%00..%2foutside",
    "outside",
    "far_outside",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_no_request_reaches_a_package_outside_the_repository(
    fenced: RunningServer, name: str
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}
    )
    for method, target, payload, headers in [
        ("GET", f"/v2/models/{name}", b"", {}),
        ("GET", f"/v2/models/{name}/versions/1/config", b"", {}),
        ("POST", f"/v2/models/{name}/infer", body, {}),
        ("POST", f"/v2/models/{name}/versions/1/compare", body, {}),
        ("POST", f"/v2/repository/models/{name}/load", b"", admin),
    ]:
        response = raw_request(fenced.port, method, target, payload, headers)
        assert response.status in (400, 404), (target, response.status, response.body)
        assert "error" in orjson.loads(response.body)
    index = httpx.post(f"{fenced.url}/v2/repository/index", json={}).json()
    assert [entry["name"] for entry in index] == ["mlp"]


# ---------------------------------------------------------------- a killed conversion

SLOW_NET = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    class Sleepy(nn.Module):
        '''A BN MLP whose forward sleeps: tracing and export are quick, every
        verification run (the original model, eager) takes a while.'''

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Linear(8, 3))

        def forward(self, x):
            if not isinstance(x, torch.fx.Proxy):
                time.sleep(0.5)
            return self.body(x)

    def build():
        torch.manual_seed(0)
        return Sleepy().eval()
    """
)


def test_a_conversion_killed_midway_leaves_no_package(tmp_path: Path) -> None:
    """SIGKILL while the staging directory exists: nothing visible, and nothing served."""
    pytest.importorskip("torch")
    net = tmp_path / "sleepy.py"
    net.write_text(SLOW_NET)
    repository = tmp_path / "repo"
    command = [sys.executable, "-m", "bnfold", "convert", f"{net}:build",
               "--name", "sleepy", "--input-shape", "1,6", "--repository", str(repository)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # killed once its staging directory holds a file: in the export or verification
        while not (repository.is_dir() and any(repository.glob(".sleepy.1.tmp-*/*"))):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the conversion never staged its package"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (repository / "sleepy").exists()
    staged = [path.name for path in repository.iterdir()]
    assert len(staged) == 1 and staged[0].startswith(".sleepy.1.tmp-"), staged
    assert scan_repository(repository) == []  # the service sees no package
    assert list((repository / staged[0]).iterdir()), "killed before writing anything"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert sorted(path.name for path in repository.iterdir()) == ["sleepy"]
    assert [location.name for location in scan_repository(repository)] == ["sleepy"]
