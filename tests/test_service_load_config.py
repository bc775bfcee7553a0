"""Load with config: Triton's `parameters.config` override, as tritonclient sends it.

The parser alone (what it takes, what it refuses and how it says so), the
batching policy's preferred sizes, the registry on real packages (which
versions get the override, how long it lasts, that a refused config changes
nothing), then the real `tritonclient.http` against a real server:
`load_model(name, config=...)` and `get_model_config` reflecting it, the
warm-up shown as Triton's `model_warmup`, and preferred batch sizes cutting
the batcher's merged runs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bnfold.package_format import EVAL_GRAPH, BatchingFields, ManifestTensor
from bnfold.service.batch_policy import BatchPolicy, resolve_policy
from bnfold.service.errors import BadRequest
from bnfold.service.load_config import (
    ConfigOverride,
    decode_config_parameter,
    parse_config_override,
)
from bnfold.service.registry import ModelRegistry
from bnfold.service.sessions import SessionConfig
from bnfold.service.settings import Settings

from service_packages import MLP_IN, MLP_SEEDS, mlp_reference, mlp_weights, write_mlp
from service_server import ADMIN_TOKEN, running_server

CPU_CONFIG = SessionConfig(providers=("CPUExecutionProvider",))
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FLOAT32_EPS = float(np.finfo(np.float32).eps)
#: the override the registry and end-to-end tests load (every honoured field)
OVERRIDE = {
    "max_batch_size": 8,
    "dynamic_batching": {
        "preferred_batch_size": [4, 2],
        "max_queue_delay_microseconds": 500,
        "default_queue_policy": {"max_queue_size": 7},
    },
}


# ---------------------------------------------------------------- the parser


def test_every_honoured_field_is_parsed() -> None:
    """Integers as numbers or decimal strings, names as fields or lowerCamelCase (protobuf's
    JSON mapping, which Triton parses the config with, takes both)."""
    expected = ConfigOverride(
        BatchingFields(max_batch_size=8, max_queue_delay_us=500, max_queue_size=7), (2, 4)
    )
    assert parse_config_override({**OVERRIDE, "name": "mlp"}, "mlp") == expected
    camel = {
        "maxBatchSize": "8",
        "dynamicBatching": {
            "preferredBatchSize": [2, "4", 4],
            "maxQueueDelayMicroseconds": "500",
            "defaultQueuePolicy": {"maxQueueSize": 7},
        },
    }
    assert parse_config_override(camel, "mlp") == expected
    assert parse_config_override({}, "mlp") == ConfigOverride()
    only_delay = {"dynamic_batching": {"max_queue_delay_microseconds": 0}}
    assert parse_config_override(only_delay, "mlp") == ConfigOverride(
        BatchingFields(max_queue_delay_us=0)
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"instance_group": [{"count": 2}]}, "config field 'instance_group' is not supported"),
        ({"input": []}, "config field 'input' is not supported"),
        ({"model_warmup": []}, "config field 'model_warmup' is not supported"),
        (
            {"dynamic_batching": {"priority_levels": 2}},
            "config field 'dynamic_batching.priority_levels' is not supported",
        ),
        (
            {"dynamic_batching": {"default_queue_policy": {"timeout_action": "DELAY"}}},
            "config field 'dynamic_batching.default_queue_policy.timeout_action' is not supported",
        ),
        ({"name": "pixels"}, "config field 'name' is \"pixels\" but the model loaded is 'mlp'"),
        ({"max_batch_size": -1}, "config field 'max_batch_size' must be between 0 and"),
        ({"max_batch_size": 2**31}, "config field 'max_batch_size' must be between 0 and"),
        ({"max_batch_size": 1.5}, "config field 'max_batch_size' must be an integer (got 1.5)"),
        ({"max_batch_size": True}, "config field 'max_batch_size' must be an integer (got true)"),
        ({"max_batch_size": "eight"}, "config field 'max_batch_size' must be an integer"),
        ({"dynamic_batching": 5}, "config field 'dynamic_batching' must be an object"),
        (
            {"dynamic_batching": {"max_queue_delay_microseconds": 1_000_001}},
            "config field 'dynamic_batching.max_queue_delay_microseconds' must be between 0 "
            "and 1000000",
        ),
        (
            {"dynamic_batching": {"default_queue_policy": {"max_queue_size": 0}}},
            "config field 'dynamic_batching.default_queue_policy.max_queue_size' is 0, an "
            "unbounded queue in Triton",
        ),
        (
            {"dynamic_batching": {"preferred_batch_size": [4]}},
            "config field 'dynamic_batching.preferred_batch_size' needs max_batch_size",
        ),
        (
            {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [2, 8]}},
            "config field 'dynamic_batching.preferred_batch_size[1]' is 8, above max_batch_size 4",
        ),
        (
            {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [0]}},
            "config field 'dynamic_batching.preferred_batch_size[0]' must be between 1 and",
        ),
        (
            {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": 2}},
            "config field 'dynamic_batching.preferred_batch_size' must be a list",
        ),
        (
            {"max_batch_size": 4, "maxBatchSize": 4},
            "config field 'maxBatchSize' is given twice",
        ),
    ],
)
def test_a_config_bnfold_cannot_honour_is_refused_naming_the_field(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_config_override(config, "mlp")
    assert refused.value.message.startswith(message), refused.value.message
    assert refused.value.status_code == 400


def test_the_load_parameter_is_a_json_object_in_a_string() -> None:
    assert decode_config_parameter(json.dumps(OVERRIDE)) == OVERRIDE
    for value, message in (
        ({"max_batch_size": 8}, "load parameter 'config' must be a string"),
        ("{max_batch_size: 8}", "load parameter 'config' is not valid JSON: "),
        ("[8]", "load parameter 'config' must hold a JSON object"),
    ):
        with pytest.raises(BadRequest) as refused:
            decode_config_parameter(value)
        assert refused.value.message.startswith(message)


# ---------------------------------------------------------------- preferred batch sizes


def test_preferred_sizes_decide_when_a_batch_goes_and_how_large() -> None:
    """Triton's dynamic batcher: the largest preferred size the queue fills goes at once;
    short of every preferred size, up to max_batch_size after the delay."""
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2, 4))
    assert [policy.batch_ready(rows) for rows in (1, 2, 3, 8)] == [False, True, True, True]
    assert [policy.batch_limit(rows) for rows in (1, 2, 3, 5, 9)] == [8, 2, 2, 4, 4]
    plain = BatchPolicy(max_batch_size=8)
    assert [plain.batch_ready(rows) for rows in (1, 7, 8)] == [False, False, True]
    assert [plain.batch_limit(rows) for rows in (1, 20)] == [8, 8]


def test_the_dynamic_batching_block_shows_the_preferred_sizes_or_the_limit() -> None:
    policy = BatchPolicy(8, 500, 7, preferred_batch_sizes=(2, 4))
    assert policy.dynamic_batching() == {
        "preferred_batch_size": [2, 4],
        "max_queue_delay_microseconds": 500,
        "default_queue_policy": {"max_queue_size": 7},
    }
    assert BatchPolicy(16, 0, 9).dynamic_batching() == {
        "preferred_batch_size": [16],
        "max_queue_delay_microseconds": 0,
        "default_queue_policy": {"max_queue_size": 9},
    }
    assert BatchPolicy(1, disabled_reason="max_batch_size is 1").dynamic_batching() is None


def test_resolve_policy_refuses_preferred_sizes_above_the_limit() -> None:
    tensors = [ManifestTensor(name="x", datatype="FP32", shape=(-1, 3))]
    with pytest.raises(ValueError, match="must be between 1 and max_batch_size 4"):
        resolve_policy((BatchingFields(max_batch_size=4),), tensors, tensors, BatchPolicy(), (8,))


# ---------------------------------------------------------------- the registry


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """mlp versions 1 and 2; REPO/mlp/config.json sets max_batch_size 12 and a queue of 99."""
    root = tmp_path / "repository"
    for version, seed in MLP_SEEDS.items():
        write_mlp(root, "mlp", version, seed)
    (root / "mlp" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 12, "max_queue_size": 99}})
    )
    return root


def _policies(registry: ModelRegistry) -> dict[int, BatchPolicy]:
    return {entry.version: entry.model.batching for entry in registry.index() if entry.model}


def test_an_override_applies_to_every_version_above_config_json(repository: Path) -> None:
    registry = ModelRegistry(repository, CPU_CONFIG, BatchPolicy(32, 0, 256))
    registry.load_all()
    assert _policies(registry) == {1: BatchPolicy(12, 0, 99), 2: BatchPolicy(12, 0, 99)}
    registry.load("mlp", OVERRIDE)
    overridden = BatchPolicy(8, 500, 7, preferred_batch_sizes=(2, 4))
    assert _policies(registry) == {1: overridden, 2: overridden}
    # a field the override leaves out keeps config.json's (then the server's) value
    registry.load("mlp", {"dynamic_batching": {"max_queue_delay_microseconds": 40}})
    assert _policies(registry)[2] == BatchPolicy(12, 40, 99)


def test_the_warm_up_follows_the_overridden_sizes(repository: Path) -> None:
    registry = ModelRegistry(repository, CPU_CONFIG)
    registry.load("mlp", OVERRIDE)
    model = registry.get("mlp")
    assert [run.rows for run in model.warmup if run.graph == EVAL_GRAPH] == [8, 4, 2, 1]


def test_the_override_lasts_until_a_load_without_config(repository: Path) -> None:
    """Through a one-version load (a roll forward) too; a load without config, or a
    reload of the whole repository, drops it."""
    registry = ModelRegistry(repository, CPU_CONFIG)
    registry.load_all()
    registry.load("mlp", {"max_batch_size": 3})
    write_mlp(repository, "mlp", 3, seed=3)
    registry.load_version("mlp", 3)
    assert {number: policy.max_batch_size for number, policy in _policies(registry).items()} == {
        1: 3,
        2: 3,
        3: 3,
    }
    registry.load("mlp")
    assert {policy.max_batch_size for policy in _policies(registry).values()} == {12}
    registry.load("mlp", {"max_batch_size": 3})
    registry.load_all()
    assert {policy.max_batch_size for policy in _policies(registry).values()} == {12}


def test_max_batch_size_zero_turns_merging_off(repository: Path) -> None:
    """Triton's 0: the model does not batch; bnfold's: no merged runs (requests still run)."""
    registry = ModelRegistry(repository, CPU_CONFIG)
    registry.load("mlp", {"max_batch_size": 0})
    policy = registry.get("mlp").batching
    assert not policy.batching and policy.disabled_reason == "max_batch_size is 0"
    assert policy.dynamic_batching() is None


def test_a_refused_config_changes_nothing(repository: Path) -> None:
    registry = ModelRegistry(repository, CPU_CONFIG)
    registry.load("mlp", {"max_batch_size": 3})
    served = registry.get("mlp")
    with pytest.raises(BadRequest, match="config field 'instance_group' is not supported"):
        registry.load("mlp", {"max_batch_size": 5, "instance_group": []})
    assert registry.get("mlp") is served  # not reloaded
    registry.load_version("mlp", 1)  # the earlier override still holds
    assert registry.get("mlp", "1").batching.max_batch_size == 3


# ---------------------------------------------------------------- tritonclient, end to end


@pytest.fixture
def server(repository: Path) -> Iterator[str]:
    settings = Settings(repository=repository, device="cpu", admin_token=ADMIN_TOKEN)
    with running_server(settings) as running:
        yield running.address


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server)
    yield client
    client.close()


def _expected_model_warmup(sizes: list[int]) -> list[dict[str, Any]]:
    """Triton's model_warmup for zeros of the mlp input at each size (max_batch_size 0 in the
    config: batch_size 1 and the rows in the dims)."""
    return [
        {
            "name": f"zeros_{rows}_rows",
            "batch_size": 1,
            "count": 1,
            "inputs": {
                "input": {"data_type": "TYPE_FP32", "dims": [rows, MLP_IN], "zero_data": True}
            },
        }
        for rows in sizes
    ]


def test_load_model_with_config_and_get_model_config_reflects_it(
    client: triton.InferenceServerClient,
) -> None:
    before = client.get_model_config("mlp")
    assert before["dynamic_batching"]["preferred_batch_size"] == [12]  # config.json's limit
    assert before["model_warmup"] == _expected_model_warmup([12, 1])
    client.load_model("mlp", headers=ADMIN, config=json.dumps(OVERRIDE))
    for version in (None, "1", "2"):
        config = client.get_model_config("mlp", version or "")
        assert config["max_batch_size"] == 0  # the dims keep their -1 batch axis
        assert config["dynamic_batching"] == {
            "preferred_batch_size": [2, 4],
            "max_queue_delay_microseconds": 500,
            "default_queue_policy": {"max_queue_size": 7},
        }
        assert config["model_warmup"] == _expected_model_warmup([8, 4, 2, 1])
    batching = client.get_model_metadata("mlp")["parameters"]["batching"]
    assert (batching["max_batch_size"], batching["max_queue_size"]) == (8, 7)
    client.load_model("mlp", headers=ADMIN)  # without config: back to config.json's
    assert client.get_model_config("mlp") == before


def test_a_config_bnfold_cannot_honour_is_a_400_naming_the_field(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.load_model(
            "mlp", headers=ADMIN, config=json.dumps({"instance_group": [{"count": 4}]})
        )
    assert refused.value.status() == "400"
    assert refused.value.message().startswith(
        "config field 'instance_group' is not supported by bnfold"
    )
    with pytest.raises(InferenceServerException) as not_json:
        client.load_model("mlp", headers=ADMIN, config="{max_batch_size: 4}")
    assert not_json.value.status() == "400"
    assert "load parameter 'config' is not valid JSON" in not_json.value.message()
    assert client.get_model_config("mlp")["dynamic_batching"]["preferred_batch_size"] == [12]


def test_override_files_are_refused(client: triton.InferenceServerClient) -> None:
    """`files` would replace the package: packages come from the repository on disk."""
    with pytest.raises(InferenceServerException) as refused:
        client.load_model(
            "mlp",
            headers=ADMIN,
            config=json.dumps({"max_batch_size": 4}),
            files={"file:1/model.onnx": b"not a graph"},
        )
    assert refused.value.status() == "400"
    assert "file:1/model.onnx" in refused.value.message()


def _metric(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.split("{")[0] == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_preferred_sizes_cut_the_merged_runs(
    server: str, client: triton.InferenceServerClient
) -> None:
    """A second's wait for company and preferred size 2: of three one-row requests sent
    together, two go as soon as they are queued together and the third waits alone; without
    preferred sizes all three would wait the second and run as one batch of 3. Checked on
    the run-size histogram; every answer against numpy."""
    config = {
        "max_batch_size": 8,
        "dynamic_batching": {"preferred_batch_size": [2], "max_queue_delay_microseconds": 10**6},
    }
    client.load_model("mlp", headers=ADMIN, config=json.dumps(config))
    url = f"http://{server}"
    rows = np.random.default_rng(3).normal(size=(3, 1, MLP_IN)).astype(np.float32)
    barrier = threading.Barrier(3)
    answers: list[Any] = [None] * 3

    def send(index: int) -> None:
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, MLP_IN],
                    "datatype": "FP32",
                    "data": rows[index].ravel().tolist(),
                }
            ]
        }
        with httpx.Client(base_url=url, timeout=30) as http:
            barrier.wait()
            answers[index] = http.post("/v2/models/mlp/versions/2/infer", json=body)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for index, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        [output] = answer.json()["outputs"]
        expected = mlp_reference(mlp_weights(MLP_SEEDS[2]), rows[index])["eval"]
        tolerance = 32 * FLOAT32_EPS * float(np.abs(expected).max())
        got = np.asarray(output["data"]).reshape(output["shape"])
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
    metrics = httpx.get(f"{url}/metrics").text
    runs = _metric(metrics, "bnfold_run_batch_size_count", model="mlp")
    assert _metric(metrics, "bnfold_run_batch_size_sum", model="mlp") == 3
    assert _metric(metrics, "bnfold_run_batch_size_bucket", model="mlp", le="2.0") == runs
