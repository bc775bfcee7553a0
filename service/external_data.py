"""Which bytes a graph may read besides its own: its external-data files, verified, in memory.

An ONNX tensor can keep its data in another file (`data_location: EXTERNAL`,
`location`, `offset`, `length`). onnxruntime resolves such a location against
the model file's directory, and against the process's working directory when
the model comes from bytes: a package could name `../../etc/passwd` as a weight
and have it served back. So the service never lets onnxruntime touch the disk:

* only the main graph's dense initializers may be external: onnxruntime takes
  those from the in-memory table below, but reads any other external tensor
  (in an If/Loop/Scan subgraph, a sparse initializer, a function's attribute
  default) from the disk even when a table is given. Any such tensor anywhere
  in the model (found by walking every message of the protobuf, so a field
  added to ONNX later is covered too) makes the package unavailable;
* every allowed reference must name a file the manifest lists (and
  `read_package` has already hashed), relative, without `..`, inside its range;
* the bytes go to onnxruntime from memory (`external_file_table`). The table is
  never empty (`NO_FILE` stands in), because with a table onnxruntime fails on a
  main-graph location it does not hold instead of falling back to the disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from bnfold.service.errors import PackageError

if TYPE_CHECKING:
    import onnx

#: The stand-in entry of an otherwise empty table: a name no ONNX location can spell.
NO_FILE = "\0no external data"


def external_file_table(
    graph: bytes, graph_file: str, verified: Mapping[str, bytes]
) -> dict[str, bytes]:
    """{location as the graph spells it: the verified bytes of that file}, never empty.

    Raises `PackageError` for a location that is absolute, climbs with `..`,
    names a file the manifest does not list, or a range past the file's end.
    """
    table = {NO_FILE: b""}
    if b"location" not in graph:  # no external_data entry can exist without this key
        return table
    import onnx  # only here: a server whose graphs keep their weights inside never needs it

    try:
        model = onnx.ModelProto.FromString(graph)
    except DecodeError as exc:
        raise PackageError(f"{graph_file} is not an ONNX model: {exc}") from None
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            location = entries.get("location", "")
            table[location] = _checked_file(graph_file, tensor.name, entries, verified)
    for where, tensor in _other_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise PackageError(
                f"{graph_file}: tensor {tensor.name!r} ({where}) keeps its data in an external "
                "file; only the main graph's initializers may (onnxruntime would read the "
                "others from the disk)"
            )
    return table


def _checked_file(
    graph_file: str, tensor: str, entries: dict[str, str], verified: Mapping[str, bytes]
) -> bytes:
    location = entries.get("location", "")
    where = f"{graph_file}: tensor {tensor!r} takes its data from {location!r}"
    path = PurePosixPath(location)
    if not location or "\\" in location or path.is_absolute() or ".." in path.parts:
        raise PackageError(
            f"{where}: external data must be a file of the package, named relatively"
        )
    content = verified.get(str(path))
    if content is None:
        raise PackageError(
            f"{where}, which {graph_file}'s package does not list in manifest.json: "
            "only hashed files of the package are read"
        )
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else len(content) - offset
    except ValueError:
        raise PackageError(f"{where}: offset and length must be integers") from None
    if offset < 0 or length < 0 or offset + length > len(content):
        raise PackageError(
            f"{where}: bytes {offset}..{offset + length} are outside the file's {len(content)}"
        )
    return content


#: onnx's TensorProto, by its protobuf name: the walk needs no import of onnx
_TENSOR_PROTO = "onnx.TensorProto"


def _other_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto of `model` but the main graph's initializers, with where it sits."""
    for field, value in model.ListFields():
        if field.name == "graph":
            for graph_field, graph_value in value.ListFields():
                if graph_field.name != "initializer":
                    yield from _tensors_in(graph_field, graph_value, f"graph.{graph_field.name}")
        else:
            yield from _tensors_in(field, value, field.name)


def _tensors_in(
    field: FieldDescriptor, value: object, where: str
) -> Iterator[tuple[str, onnx.TensorProto]]:
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        return
    items = value if _is_repeated(field) else (value,)
    for item in items:  # type: ignore[union-attr]
        if item.DESCRIPTOR.full_name == _TENSOR_PROTO:  # type: ignore[union-attr]
            yield where, item
        else:
            for inner_field, inner_value in item.ListFields():
                yield from _tensors_in(inner_field, inner_value, f"{where}.{inner_field.name}")


def _is_repeated(field: FieldDescriptor) -> bool:
    """`is_repeated` in protobuf 6 and later, `label` before it (onnx allows both)."""
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]
