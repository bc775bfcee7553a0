"""Reading an ONNX source file and writing ONNX files, external data included.

Every way a file can be unusable ends here as a `ConvertError` with a message
naming the file: missing, not ONNX, truncated, refused by the checker, an
opset outside 9..`onnx.defs.onnx_opset_version()`, no inputs, a missing
external-data file, BatchNormalization inside a control-flow subgraph.

Models over the 2 GB protobuf limit never go through a single serialization:
the structure is loaded without weights (`load_external_data=False`), shape
inference runs on that small proto, the checker runs on the path, and the
weights are read from their side files afterwards. Writing uses external data
(one `<file>.data` next to the model) whenever the source had external data or
the weights approach the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import AttributeProto, ModelProto, NodeProto
from onnx.external_data_helper import (
    load_external_data_for_model,
    set_external_data,
    uses_external_data,
)

from bnfold.convert.errors import SourceError, UnsupportedSource, first_line
from bnfold.convert.onnx.graph import (
    TensorInfo,
    default_opset,
    has_subgraph,
    infer_tensor_info,
    name_nodes_uniquely,
)
from bnfold.package_format import sha256_file

MIN_OPSET = 9
#: Protobuf refuses messages of 2 GiB; leave room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26
#: Tensors at least this big go to the side file when writing external data.
EXTERNAL_DATA_THRESHOLD = 1024


@dataclass
class OnnxSource:
    """A validated source model: weights in memory, nodes uniquely named.

    `tensor_info` is shape inference on the unmodified graph; `external_data`
    says the weights lived in side files.
    """

    path: Path
    model: ModelProto
    tensor_info: dict[str, TensorInfo]
    opset: int
    sha256: str
    external_data: bool


def load_onnx_source(path: Path) -> OnnxSource:
    """Read and validate `path`; raises SourceError / UnsupportedSource (exit 2)."""
    if not path.is_file():
        raise SourceError(f"cannot read {path}: no such file")
    structure = _parse(path)
    opset = _check_opset(structure, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as error:
        raise SourceError(f"{path} is not a valid ONNX model: {first_line(error)}") from error
    initializers = {tensor.name for tensor in structure.graph.initializer}
    if not [value for value in structure.graph.input if value.name not in initializers]:
        raise UnsupportedSource(f"{path} has no inputs: every graph input is a constant")
    _refuse_nested_batchnorm(structure, path)
    name_nodes_uniquely(structure.graph)
    tensor_info = infer_tensor_info(structure)
    external = any(uses_external_data(tensor) for tensor in structure.graph.initializer)
    try:
        load_external_data_for_model(structure, str(path.parent))
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot read the external data of {path}: {error}") from error
    return OnnxSource(path, structure, tensor_info, opset, sha256_file(path), external)


def _parse(path: Path) -> ModelProto:
    try:
        model = onnx.load_model(str(path), format="protobuf", load_external_data=False)
    except Exception as error:
        raise SourceError(
            f"{path} is not an ONNX model (cannot parse it; truncated or another format?): "
            f"{first_line(error)}"
        ) from error
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise SourceError(f"{path} is not an ONNX model: it has no graph (or an empty one)")
    return model


def _check_opset(model: ModelProto, path: Path) -> int:
    """The default-domain opset, if bnfold supports it (9 up to what this onnx defines)."""
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        raise UnsupportedSource(f"{path} imports no ai.onnx opset")
    if opset < MIN_OPSET:
        raise UnsupportedSource(
            f"{path} uses opset {opset}; bnfold supports opsets {MIN_OPSET} to {newest}. "
            f"Upgrade it first, e.g. onnx.version_converter.convert_version(model, {MIN_OPSET + 4})"
        )
    if opset > newest:
        raise UnsupportedSource(
            f"{path} uses opset {opset}, newer than this onnx {onnx.__version__} knows "
            f"(up to {newest}); upgrade onnx"
        )
    return opset


def _refuse_nested_batchnorm(model: ModelProto, path: Path) -> None:
    for node in model.graph.node:
        if has_subgraph(node) and "BatchNormalization" in _nested_op_types(node):
            raise UnsupportedSource(
                f"{path}: node {node.name or node.op_type} has a BatchNormalization inside its "
                "subgraph; bnfold handles BatchNormalization in the main graph only"
            )


def _nested_op_types(node: NodeProto) -> set[str]:
    found: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else attribute.graphs
        for graph in graphs:
            for inner in graph.node:
                found.add(inner.op_type)
                found |= _nested_op_types(inner)
    return found


def weights_size(model: ModelProto) -> int:
    """Serialized size of the initializers and nodes (Constant payloads), in bytes."""
    graph = model.graph
    return sum(t.ByteSize() for t in graph.initializer) + sum(n.ByteSize() for n in graph.node)


def fits_in_one_proto(model: ModelProto) -> bool:
    """Whether `model` can be serialized as one protobuf message (under `PROTOBUF_LIMIT`)."""
    return weights_size(model) < PROTOBUF_LIMIT


def needs_external_data(model: ModelProto, *, source_external: bool) -> bool:
    """External data when the source used it, or when one proto could not hold the weights."""
    return source_external or not fits_in_one_proto(model)


def save_model(model: ModelProto, path: Path, *, external: bool, check: bool = True) -> list[Path]:
    """Write `model` to `path` (and `<name>.data` when external), check it; return the files.

    With external data, onnx moves the weights out of the in-memory `model`
    while saving: treat the proto as consumed afterwards. `check=False` is for
    internal scratch graphs that onnxruntime validates when it loads them.
    """
    if external:
        data_name = f"{path.name}.data"
        (path.parent / data_name).unlink(missing_ok=True)
        # Only the main graph's initializers: the service reads external data from the
        # package in memory, which onnxruntime honours for those alone (a subgraph's
        # external tensor it would read from the disk; the service refuses such a graph).
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_THRESHOLD:
                set_external_data(tensor, data_name)
    onnx.save_model(model, str(path))
    if check:
        onnx.checker.check_model(str(path))
    files = [path]
    if external and (path.parent / f"{path.name}.data").exists():
        files.append(path.parent / f"{path.name}.data")
    return files
