"""Which bytes a graph may read besides its own: its external-data files, verified, in memory.

An ONNX tensor can keep its data in another file (`data_location: EXTERNAL`,
`location`, `offset`, `length`). onnxruntime resolves such a location against
the model file's directory, and against the process's working directory when
the model comes from bytes: a package could name `etc/passwd` as a weight and
have it served back. So the service never lets onnxruntime touch the disk:
every external reference of a graph must name a file the manifest lists (and
`read_package` has already hashed), relative, without `..`, inside its range;
the bytes go to onnxruntime from memory (`external_file_table`). The table is
never empty (`NO_FILE` stands in), because with a table onnxruntime fails on a
location it does not hold instead of falling back to the disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath

import onnx
from google.protobuf.message import DecodeError

from bnfold.service.errors import PackageError

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
    try:
        model = onnx.ModelProto.FromString(graph)
    except DecodeError as exc:
        raise PackageError(f"{graph_file} is not an ONNX model: {exc}") from None
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        table[location] = _checked_file(graph_file, tensor.name, entries, verified)
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


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """Tensors in a node's attributes, subgraphs (If, Loop, Scan) included."""
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        sparse_tensors = [*attribute.sparse_tensors]
        if attribute.HasField("sparse_tensor"):
            sparse_tensors.append(attribute.sparse_tensor)
        for sparse in sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)
