"""The serving process never imports torch, not even transitively or lazily; nor onnx
(7 MB resident) while no package keeps external data and no recalibration runs.

Checked in a fresh interpreter (this test process may hold torch from other
tests) in which importing torch raises: the entry point is imported, a real
server loads the repository and answers infer, compare, metadata and the
repository index, and afterwards `sys.modules` has no torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

SCRIPT = """
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not allowed in the serving process")
        return None

sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, sys.argv[2])

from pathlib import Path

import httpx

import bnfold.cli  # the `bnfold` entry point, converter commands registered
from bnfold.service.settings import Settings
from service_server import running_server

batch = [[0.5] * 8, [-0.5] * 8]
tensor = {"name": "input", "shape": [2, 8], "datatype": "FP32", "data": batch}
statuses = {}
with running_server(Settings(repository=Path(sys.argv[1]), device="cpu")) as server:
    with httpx.Client(base_url=server.url) as client:
        statuses["infer"] = client.post("/v2/models/mlp/infer", json={"inputs": [tensor]}).status_code
        statuses["compare"] = client.post("/v2/models/mlp/compare", json={"inputs": [tensor]}).status_code
        statuses["metadata"] = client.get("/v2/models/mlp").status_code
        statuses["index"] = client.post("/v2/repository/index").status_code
        statuses["docs"] = client.get("/openapi.json").status_code
loaded = {root: sorted(m for m in sys.modules if m.split(".")[0] == root) for root in ("torch", "onnx")}
print(json.dumps({"statuses": statuses, **loaded}))
"""


def test_serving_never_imports_torch(service_repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(service_repository), str(TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == {
        "infer": 200,
        "compare": 200,
        "metadata": 200,
        "index": 200,
        "docs": 200,
    }
    assert report["torch"] == []
    assert report["onnx"] == []
