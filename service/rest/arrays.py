"""Array bodies: one .npy array or an .npz archive of them, read safely within the budget.

Compare and recalibrate take their inputs as numpy files as well as V2 tensors.
Which body is which is decided by the headers before the body is read:

* `application/x-npy`, or `application/octet-stream` without
  `Inference-Header-Content-Length` (with it, the body is Triton's binary
  tensor form): one .npy array, the inputs of a one-input model;
* `application/x-npz` or `application/zip`: an .npz, one array per input
  name (a one-input model also takes a single array of any name, the rule of
  `bnfold recalibrate`'s data files).

Why not `np.load`: it allocates the shape a .npy header declares before it
reads a byte of data, so a 100-byte body declaring 2**44 floats is a
MemoryError (a 500), and it copies the data it does read. Here numpy's own
header reader parses the header (no pickle: object arrays are refused, the
guarantee of `allow_pickle=False`), the data must be exactly the bytes the
header declares, and the array is a zero-copy view of them, like a binary
tensor's view of the body.

An .npz is a zip, so what it inflates to is not what it weighs. Before
anything is inflated: its end-of-central-directory record must declare at most
`MAX_NPZ_MEMBERS` members in a directory of at most `MAX_CENTRAL_DIRECTORY_BYTES`
(zipfile builds an object per directory entry, about 400 bytes for 47 bytes of
body), each member stored or deflated (what `np.savez` and
`np.savez_compressed` write), and the members' declared sizes together within
the decode budget (`max_decode_bytes`, 413 above it), held from the budget
like a JSON body's decode cost. The real inflated bytes are counted too (a
zip can lie about its sizes): each member goes into a buffer of its declared
size and must fill it exactly.
"""

from __future__ import annotations

import io
import math
import struct
import tokenize
import zipfile
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final, Literal

import numpy as np
from starlette.requests import Request

from bnfold.package_format import DATATYPE_OF_DTYPE
from bnfold.service.codec import MAX_RANK, DecodedRequest
from bnfold.service.errors import BadRequest, PayloadTooLarge
from bnfold.service.protocol import INFERENCE_HEADER
from bnfold.service.rest.bodies import frozen, read_body, run_sized

ArrayKind = Literal["npy", "npz"]
NPY: Final = "npy"
NPZ: Final = "npz"
NPY_TYPES: Final = ("application/x-npy", "application/octet-stream")
NPZ_TYPES: Final = ("application/x-npz", "application/zip")
ArrayBody = np.ndarray | dict[str, np.ndarray]

MAX_NPZ_MEMBERS: Final = 64
#: A directory entry is 46 bytes plus its name and extra fields: 4 KiB each is generous.
MAX_CENTRAL_DIRECTORY_BYTES: Final = MAX_NPZ_MEMBERS * 4096
_END_OF_DIRECTORY: Final = b"PK\x05\x06"
_END_OF_DIRECTORY_BYTES: Final = 22
_MAX_ZIP_COMMENT: Final = 0xFFFF
_ZIP_COMPRESSIONS: Final = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
#: magic (6), version (2), header length (4), and numpy's own limit on the header text.
_NPY_PREFIX_BYTES: Final = 12 + 10_000
_INFLATE_CHUNK: Final = 1 << 20
#: What zipfile raises for a damaged archive: its own errors, zlib's, struct's and EOF for
#: cut structures, NotImplementedError for a version or feature it lacks, RuntimeError for an
#: encrypted member (it will not read one without a password), ValueError for bad names.
_ZIP_ERRORS: Final = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)
_NPY_VERSIONS: Final = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def array_body_kind(request: Request) -> ArrayKind | None:
    """Whether the body is a .npy or an .npz, by its headers alone; None for a V2 body."""
    kind = media_type(request)
    if kind in NPZ_TYPES:
        return NPZ
    if kind == NPY_TYPES[0] or (kind == NPY_TYPES[1] and INFERENCE_HEADER not in request.headers):
        return NPY
    return None


def read_npy(data: bytes | bytearray | memoryview, what: str = "the body") -> np.ndarray:
    """The array of a .npy file, a view of `data`; BadRequest (400) when it is not one, holds
    Python objects, has no V2 datatype, or its data is not the size its header declares."""
    view = memoryview(data)
    head = io.BytesIO(view[:_NPY_PREFIX_BYTES].tobytes())
    try:
        version = np.lib.format.read_magic(head)
        read_header = _NPY_VERSIONS.get(version)
        if read_header is None:
            raise ValueError(f"version {version[0]}.{version[1]} is not supported (1.0, 2.0 are)")
        shape, fortran_order, dtype = read_header(head)
    except (ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as exc:
        # numpy tokenizes a header it cannot evaluate, to read the Python 2 form
        raise BadRequest(f"{what} is not a .npy array: {exc}") from None
    if dtype.hasobject:
        raise BadRequest(
            f"{what} holds Python objects (dtype {dtype}), which only pickle can read: send numbers"
        )
    if dtype not in DATATYPE_OF_DTYPE:
        raise BadRequest(
            f"{what} has dtype {dtype.str}, which is no V2 datatype: use one of "
            f"{', '.join(sorted({d.name for d in DATATYPE_OF_DTYPE}))} in native byte order"
        )
    if len(shape) > MAX_RANK or any(dim < 0 for dim in shape):
        raise BadRequest(
            f"{what} is not a .npy array this server reads: shape {list(shape)} (at most "
            f"{MAX_RANK} dimensions, none negative)"
        )
    count = math.prod(shape)
    declared = count * dtype.itemsize
    given = len(view) - head.tell()
    if given != declared:
        raise BadRequest(
            f"{what} is not a .npy array: its header declares shape {list(shape)} of {dtype} "
            f"({declared} bytes) but {given} bytes of data follow"
        )
    array = np.frombuffer(view, dtype=dtype, count=count, offset=head.tell())
    try:  # an empty array whose other dims overflow an index ([0, 2**63]) has no shape
        return array.reshape(shape, order="F" if fortran_order else "C")
    except ValueError:
        raise BadRequest(f"{what}: shape {list(shape)} is too large for any array") from None


def _central_directory(body: bytes) -> None:
    """Refuse an archive whose end record declares more members or directory bytes than an
    .npz of model inputs needs, before zipfile reads the directory (the search is zipfile's)."""
    start = body.rfind(
        _END_OF_DIRECTORY, max(0, len(body) - _END_OF_DIRECTORY_BYTES - _MAX_ZIP_COMMENT)
    )
    if start < 0 or len(body) - start < _END_OF_DIRECTORY_BYTES:
        raise BadRequest("the body is not an .npz archive: it has no zip end-of-directory record")
    members, directory_bytes = struct.unpack_from("<HI", body, start + 10)
    if members > MAX_NPZ_MEMBERS:
        raise BadRequest(
            f"the .npz declares {members} members; at most {MAX_NPZ_MEMBERS} are taken"
        )
    if directory_bytes > MAX_CENTRAL_DIRECTORY_BYTES:
        raise BadRequest(
            f"the .npz's zip directory declares {directory_bytes} bytes; at most "
            f"{MAX_CENTRAL_DIRECTORY_BYTES} are taken"
        )


def _open_npz(body: bytes) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    _central_directory(body)
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except _ZIP_ERRORS as exc:
        raise BadRequest(f"the body is not an .npz archive: {exc}") from None
    members = archive.infolist()
    if len(members) > MAX_NPZ_MEMBERS:
        raise BadRequest(
            f"the .npz has {len(members)} members; at most {MAX_NPZ_MEMBERS} are taken"
        )
    for member in members:
        if member.compress_type not in _ZIP_COMPRESSIONS:
            raise BadRequest(
                f"the .npz member {member.filename!r} is compressed with zip method "
                f"{member.compress_type}; only stored and deflated members (np.savez, "
                "np.savez_compressed) are taken"
            )
    return archive, members


def npz_size(body: bytes) -> int:
    """The bytes the .npz's members declare they inflate to, read from its directory alone."""
    archive, members = _open_npz(body)
    with archive:
        return sum(member.file_size for member in members)


def _array_name(filename: str) -> str:
    return filename.removesuffix(".npy")


def _inflate(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytearray:
    """The member's bytes, which must be exactly its declared size."""
    buffer = bytearray(member.file_size)
    filled = 0
    with archive.open(member) as stream:
        while chunk := stream.read(_INFLATE_CHUNK):
            if filled + len(chunk) > member.file_size:
                raise BadRequest(
                    f"the .npz member {member.filename!r} inflates beyond the "
                    f"{member.file_size} bytes it declares"
                )
            buffer[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled != member.file_size:
        raise BadRequest(
            f"the .npz member {member.filename!r} inflates to {filled} bytes, "
            f"not the {member.file_size} it declares"
        )
    return buffer


def read_npz(body: bytes, limit: int) -> dict[str, np.ndarray]:
    """The arrays of an .npz by name (its member names without `.npy`).

    PayloadTooLarge (413) when the members declare more than `limit` bytes in
    all; BadRequest (400) for anything that is not an .npz of .npy arrays.
    """
    archive, members = _open_npz(body)
    with archive:
        declared = sum(member.file_size for member in members)
        if declared > limit:
            raise PayloadTooLarge(
                f"the .npz inflates to {declared} bytes, over the server's {limit}-byte "
                "decode budget (max_decode_bytes)"
            )
        arrays: dict[str, np.ndarray] = {}
        for member in members:
            name = _array_name(member.filename)
            if name in arrays:
                raise BadRequest(f"the .npz holds the array {name!r} twice")
            try:
                content = _inflate(archive, member)
            except _ZIP_ERRORS as exc:
                raise BadRequest(f"the body is not an .npz archive: {exc}") from None
            arrays[name] = read_npy(content, f"the .npz member {member.filename!r}")
    return arrays


def inputs_by_name(arrays: ArrayBody, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """`arrays` as {input name: array}: one array for a one-input model, else an .npz with
    exactly one array per input name (a one-input model also takes a single array of any
    name). BadRequest naming the inputs otherwise."""
    names = list(input_names)
    if isinstance(arrays, np.ndarray):
        if len(names) != 1:
            raise BadRequest(
                f"the body holds one .npy array but the model has {len(names)} inputs "
                f"({', '.join(names)}): send an .npz (Content-Type {NPZ_TYPES[0]}) with one "
                "array per input name"
            )
        return {names[0]: arrays}
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [name for name in names if name not in arrays]
    unknown = sorted(set(arrays) - set(names))
    if missing or unknown:
        problems = [
            *([f"lacks {', '.join(missing)}"] if missing else []),
            *([f"has unknown {', '.join(unknown)}"] if unknown else []),
        ]
        raise BadRequest(
            f"the .npz {' and '.join(problems)}: it needs exactly one array per model input "
            f"({', '.join(names)})"
        )
    return {name: arrays[name] for name in names}


def array_request(inputs: Mapping[str, np.ndarray]) -> DecodedRequest:
    """An array body as the request the data plane takes: inputs only, options elsewhere."""
    return DecodedRequest(
        id=None, inputs=dict(inputs), outputs=None, binary_output=False, fields={}
    )


@asynccontextmanager
async def held_arrays(request: Request, kind: ArrayKind) -> AsyncIterator[ArrayBody]:
    """The body's array (.npy) or arrays by name (.npz), within the app's body limit, their
    bytes held from its decode budget until the block ends (the arrays are views of them).

    One budget share, resized as it learns more: the body while it is read (and
    inflated, for a Content-Encoding), then the body plus what an .npz declares
    it inflates to, before inflating it. zipfile reads the .npz through a
    BytesIO, which shares a `bytes` body but copies a buffer: a body read into
    one (bodies.read_body) is made `bytes` first, twice its size held meanwhile.
    """
    state = request.app.state
    budget = state.decode_budget
    with budget.share() as share:
        body = await read_body(request, state.settings.max_body_bytes, share)
        if kind == NPY:
            share.hold(len(body), "reading this .npy")
            yield await run_sized(len(body), read_npy, frozen(body))
            return
        if not isinstance(body, bytes):
            share.hold(2 * len(body), "reading this .npz")
            body = await run_sized(len(body), bytes, body)
        share.hold(len(body) + npz_size(body), "decompressing this .npz")
        yield await run_sized(share.cost, read_npz, body, budget.limit)
