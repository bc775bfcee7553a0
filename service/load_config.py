"""Triton's `parameters.config` on a model load: the part of a model configuration bnfold honours.

tritonclient sends it as a JSON string: `load_model(name, config=json_string)`
puts it at `{"parameters": {"config": json_string}}` of the REST body and at
`parameters["config"].string_param` of gRPC's RepositoryModelLoadRequest. The
transports decode it with `decode_config_parameter`; the registry parses it
with `parse_config_override` before it loads anything, so a refused config
leaves the model as it was.

What bnfold honours, and how each field maps onto its batching policy
(`batch_policy.BatchPolicy`):

    config field                                          BatchPolicy field
    max_batch_size                                        max_batch_size
    dynamic_batching.max_queue_delay_microseconds         max_queue_delay_us
    dynamic_batching.preferred_batch_size                 preferred_batch_sizes
    dynamic_batching.default_queue_policy.max_queue_size  max_queue_size
    name                                                  (must be the model's)

`max_batch_size`. In Triton, N > 0 means the model batches, at most N rows a
batch, and the config's dims leave the batch axis out; 0 means it does not
batch and the dims are the full shapes. bnfold's configuration (GET
.../config) always shows the full shapes, -1 batch axis included, so it
reports `max_batch_size` 0 for every model, and the batching limit in
`dynamic_batching.preferred_batch_size` (and the metadata's
`parameters.batching.max_batch_size`). An override's `max_batch_size` is read
as Triton means it: N is the most rows of requests merged into one run, 0 (or
1) turns merging off, exactly what `--max-batch-size` and config.json's
`batching.max_batch_size` mean. Two differences from Triton: a request of
more than N rows is run alone instead of refused, and the dims never lose
their batch axis.

A partial override. Triton replaces config.pbtxt with the config it is sent
(and auto-completes the rest); bnfold changes the fields the config sets and
takes every other one from REPO/NAME/config.json, the manifest, the server's
settings, as without an override. So `dynamic_batching` left out does not
turn merging off (`max_batch_size` 0 or 1 does). It lasts, for every version
of the model (a version loaded later included), until the next load of the
model without a config, as in Triton; a restart forgets it.

Refused with 400, naming the field: any other field (bnfold cannot honour
`instance_group`, `input`, `model_warmup`...: a config read back from GET
.../config is not accepted as it is), a value of the wrong type or range, a
`preferred_batch_size` without a `max_batch_size` in the same config or above
it (Triton's own rule: its `max_batch_size` defaults to 0), and
`max_queue_size` 0, which means an unbounded queue in Triton and bnfold's
queues are always bounded. Integers may be JSON numbers or decimal strings,
as protobuf's JSON mapping (which Triton parses the config with) allows, and
field names may be lowerCamelCase as well.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from bnfold.package_format import BatchingFields
from bnfold.service.errors import BadRequest

#: Triton's int32 fields (`max_batch_size`, `preferred_batch_size`).
INT32_MAX: Final = 2**31 - 1
#: bnfold's bound on the queue delay (`Settings.max_queue_delay_us`): one second.
MAX_QUEUE_DELAY_US: Final = 1_000_000
_HONOURED: Final = (
    "max_batch_size",
    "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.preferred_batch_size",
    "dynamic_batching.default_queue_policy.max_queue_size",
)


@dataclass(frozen=True)
class ConfigOverride:
    """What a load's config sets: batching fields above every other source, preferred sizes."""

    batching: BatchingFields = field(default_factory=BatchingFields)
    preferred_batch_sizes: tuple[int, ...] = ()


def decode_config_parameter(value: object) -> Mapping[str, Any]:
    """The load parameter `config` (a JSON string holding an object) as a mapping."""
    if not isinstance(value, str):
        raise BadRequest(
            "load parameter 'config' must be a string holding the model configuration as JSON"
        )
    try:
        config = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"load parameter 'config' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BadRequest("load parameter 'config' must hold a JSON object (a model configuration)")
    return config


def _snake_case(key: str) -> str:
    """protobuf's lowerCamelCase JSON name of a field back to the field's name."""
    return re.sub(r"(?<!^)([A-Z])", lambda match: "_" + match.group(1).lower(), key)


def _fields(value: object, path: str, allowed: tuple[str, ...]) -> dict[str, tuple[str, Any]]:
    """An object's fields by their snake_case names, each with its dotted path as written;
    any field outside `allowed` is refused."""
    if not isinstance(value, Mapping):
        raise BadRequest(f"config field {path!r} must be an object")
    fields: dict[str, tuple[str, Any]] = {}
    for key, item in value.items():
        name = _snake_case(key)
        written = f"{path}.{key}" if path else key
        if name not in allowed:
            raise BadRequest(
                f"config field {written!r} is not supported by bnfold: a load's config may set "
                f"{', '.join(_HONOURED)} (and name)"
            )
        if name in fields:
            raise BadRequest(f"config field {written!r} is given twice")
        fields[name] = (written, item)
    return fields


def _integer(path: str, value: object, minimum: int, maximum: int) -> int:
    """An integer field: a JSON number or a decimal string, within [minimum, maximum]."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        number = int(value)
    if number is None:
        raise BadRequest(f"config field {path!r} must be an integer (got {json.dumps(value)})")
    if not minimum <= number <= maximum:
        raise BadRequest(
            f"config field {path!r} must be between {minimum} and {maximum} (got {number})"
        )
    return number


def parse_config_override(config: Mapping[str, Any], model_name: str) -> ConfigOverride:
    """The override in `config` (a Triton model configuration as JSON) for `model_name`.

    Raises `BadRequest` naming the first field bnfold cannot honour or whose value
    is wrong; nothing is loaded or changed by a refused config.
    """
    top = _fields(config, "", ("name", "max_batch_size", "dynamic_batching"))
    if "name" in top:
        path, name = top["name"]
        if name != model_name:
            raise BadRequest(
                f"config field {path!r} is {json.dumps(name)} but the model loaded is "
                f"{model_name!r}"
            )
    max_batch_size = None
    if "max_batch_size" in top:
        max_batch_size = _integer(*top["max_batch_size"], 0, INT32_MAX)
    delay = queue_size = None
    preferred: tuple[int, ...] = ()
    if "dynamic_batching" in top:
        block_path, block = top["dynamic_batching"]
        dynamic = _fields(
            block,
            block_path,
            ("max_queue_delay_microseconds", "preferred_batch_size", "default_queue_policy"),
        )
        if "max_queue_delay_microseconds" in dynamic:
            delay = _integer(*dynamic["max_queue_delay_microseconds"], 0, MAX_QUEUE_DELAY_US)
        if "default_queue_policy" in dynamic:
            policy_path, policy = dynamic["default_queue_policy"]
            queue = _fields(policy, policy_path, ("max_queue_size",))
            if "max_queue_size" in queue:
                path, value = queue["max_queue_size"]
                if value in (0, "0"):
                    raise BadRequest(
                        f"config field {path!r} is 0, an unbounded queue in Triton: bnfold's "
                        "queues are always bounded; give the most requests to queue"
                    )
                queue_size = _integer(path, value, 1, INT32_MAX)
        if "preferred_batch_size" in dynamic:
            preferred = _preferred_sizes(*dynamic["preferred_batch_size"], max_batch_size)
    return ConfigOverride(
        batching=BatchingFields(
            max_batch_size=max_batch_size,
            max_queue_delay_us=delay,
            max_queue_size=queue_size,
        ),
        preferred_batch_sizes=preferred,
    )


def _preferred_sizes(path: str, value: object, max_batch_size: int | None) -> tuple[int, ...]:
    """`preferred_batch_size`: a list of sizes from 1 to the same config's max_batch_size."""
    if not isinstance(value, list):
        raise BadRequest(f"config field {path!r} must be a list of batch sizes")
    if value and max_batch_size is None:
        raise BadRequest(
            f"config field {path!r} needs max_batch_size in the same config: each preferred "
            "size must be at most it (Triton's rule)"
        )
    limit = max_batch_size or 0
    sizes = []
    for index, item in enumerate(value):
        size = _integer(f"{path}[{index}]", item, 1, INT32_MAX)
        if size > limit:
            raise BadRequest(
                f"config field '{path}[{index}]' is {size}, above max_batch_size {limit}: "
                "a preferred batch size must be at most max_batch_size"
            )
        sizes.append(size)
    return tuple(sorted(set(sizes)))
