"""Version policy and one-version load/unload: roll forward and roll back without downtime.

Real packages, real onnxruntime sessions. Which version answered is told apart by the
outputs: each version is the MLP with different weights (seed), and its expected output
is computed by a session of its own on the same graph, independently of the registry.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.service.errors import NotFound, Unavailable
from bnfold.service.registry import SPECIFIC, ModelRegistry, ModelState
from bnfold.service.sessions import SessionConfig

from service_packages import write_mlp

CPU_CONFIG = SessionConfig(providers=("CPUExecutionProvider",))
BATCH = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(2, 8)


def _expected(package: Path) -> np.ndarray:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": BATCH})[0]


def _served(registry: ModelRegistry, version: str | None = None) -> np.ndarray:
    return registry.get("mlp", version).eval_session.run(None, {"input": BATCH})[0]


def test_latest_rolls_forward_on_load_version_and_back_on_unload_version(tmp_path: Path) -> None:
    first = write_mlp(tmp_path, "mlp", 1, seed=1)
    registry = ModelRegistry(tmp_path, CPU_CONFIG)
    registry.load_all()
    before = registry.get("mlp")
    second = write_mlp(tmp_path, "mlp", 2, seed=2)

    entry = registry.load_version("mlp", 2)

    assert entry.state is ModelState.READY
    np.testing.assert_array_equal(_served(registry), _expected(second))
    assert registry.default_version("mlp") == 2
    # version 1 kept its sessions: loading one version does not reopen the others
    assert registry.get("mlp", "1") is before

    registry.unload_version("mlp", 2)

    np.testing.assert_array_equal(_served(registry), _expected(first))
    states = {(entry.version, entry.state) for entry in registry.index()}
    assert states == {(1, ModelState.READY), (2, ModelState.UNAVAILABLE)}
    with pytest.raises(Unavailable, match="version 2 is not ready: unloaded"):
        registry.get("mlp", "2")


def test_specific_keeps_unversioned_requests_on_the_pinned_version(tmp_path: Path) -> None:
    first = write_mlp(tmp_path, "mlp", 1, seed=1)
    registry = ModelRegistry(tmp_path, CPU_CONFIG, version_policy=SPECIFIC)
    registry.load_all()
    second = write_mlp(tmp_path, "mlp", 2, seed=2)
    registry.load_version("mlp", 2)

    np.testing.assert_array_equal(_served(registry), _expected(first))
    np.testing.assert_array_equal(_served(registry, "2"), _expected(second))
    # a reload re-pins to the newest version
    registry.load("mlp")
    np.testing.assert_array_equal(_served(registry), _expected(second))


def test_specific_follows_config_json_default_version(tmp_path: Path) -> None:
    first = write_mlp(tmp_path, "mlp", 1, seed=1)
    write_mlp(tmp_path, "mlp", 2, seed=2)
    (tmp_path / "mlp" / "config.json").write_text(json.dumps({"default_version": 1}))
    registry = ModelRegistry(tmp_path, CPU_CONFIG, version_policy=SPECIFIC)
    registry.load_all()
    np.testing.assert_array_equal(_served(registry), _expected(first))

    registry.unload_version("mlp", 1)
    with pytest.raises(Unavailable, match=r"default version 1 .* is not ready: unloaded"):
        registry.get("mlp")


def test_load_version_of_a_missing_package_is_not_found(tmp_path: Path) -> None:
    write_mlp(tmp_path, "mlp", 1, seed=1)
    registry = ModelRegistry(tmp_path, CPU_CONFIG)
    registry.load_all()
    with pytest.raises(NotFound, match="no version 5"):
        registry.load_version("mlp", 5)
    with pytest.raises(NotFound, match="no version 5"):
        registry.unload_version("mlp", 5)


def test_readers_racing_a_roll_forward_and_back_always_get_a_model(tmp_path: Path) -> None:
    """Unversioned reads during repeated load/unload of version 2 never fail and always
    see version 1's or version 2's outputs."""
    expected = [_expected(write_mlp(tmp_path, "mlp", 1, seed=1))]
    registry = ModelRegistry(tmp_path, CPU_CONFIG)
    registry.load_all()
    expected.append(_expected(write_mlp(tmp_path, "mlp", 2, seed=2)))
    failures: list[BaseException] = []
    seen: set[int] = set()
    done = threading.Event()

    def read() -> None:
        for _ in range(2000):
            if done.is_set():
                return
            try:
                output = _served(registry)
            except BaseException as exc:  # any failure is the finding
                failures.append(exc)
                return
            matches = [
                i for i, candidate in enumerate(expected) if np.array_equal(output, candidate)
            ]
            if len(matches) != 1:
                failures.append(AssertionError(f"output of neither version: {output}"))
                return
            seen.add(matches[0])

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(5):
        registry.load_version("mlp", 2)
        registry.unload_version("mlp", 2)
    done.set()
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert failures == []
    assert 0 in seen
