"""Request bodies: read within the size limit, inflated, and decoded within a memory budget.

Why a budget: `max_body_bytes` caps the bytes received and inflated, not what
decoding them costs. orjson makes a Python object per JSON number and a list
slot per element, numpy then copies them: 64 MiB of `0,0,0,...` (65 KB
gzipped) took a server from 136 MiB to 1.1 GiB. So before decoding, a request's
cost is estimated (`decode_cost`, byte counts at C speed) and held from the
process's `DecodeBudget` until its response is built: a request whose estimate
alone is over the budget gets 413; one that does not fit beside the requests in
flight gets 503 with Retry-After at once (never queued: holding bodies in a
queue is the memory this bounds). Inflation holds each step of its output
from the same budget before taking it.

Reading: the body's own bytes are held from the same share while it is read,
so a burst of large bodies cannot all be in memory at once (40 clients sending
60 MiB each were all read, joined at twice their size, before anything was
held). A body that declares its length is held before a byte of it is read:
one that does not fit is answered 503 at once, and it is read into one buffer
of its size (a body that comes in one piece, as a ~1 KB MLP request does, is
kept as that piece), so it costs its size and one socket read (64-320 KB),
never the pieces and their join. A chunked body is held piece by piece as it
arrives, refused with 503 as soon as it stops fitting, and held twice over for
its join. The decode estimate then resizes the share; it counts the body once.
A refused body still crosses the network: uvicorn answers, then reads and
discards the rest of the body on a keep-alive connection (the client gets
the 503, not a reset) and the next request on it is read as usual; what it
costs is the transfer and the parser's time, not memory. When the connection
closes after the answer (`Connection: close`, as urllib sends, or HTTP/1.0)
the body is read and dropped here first, up to the body limit: closing with
bytes unread sends a reset, and a client that writes its whole body before
reading lost every such 503 to it. (A client that sends `Expect:
100-continue`, as curl does above 1 MiB, is answered before it sends the body
at all.) A body declaring more than `max_body_bytes` is refused (413) without
reading it either way. Measured on `bnfold serve` (2 CPUs, binary MLP bodies,
default budget, peak RSS over the idle server): 32 clients x 15 MiB (16 MiB
limit, 144 MiB budget) +702 MiB before, +190 MiB now (9 answered, 23 x 503);
40 clients x 60 MiB (64 MiB limit, 576 MiB budget) +3626 MiB before, +731 MiB
now (9 answered, 31 x 503). What peak RSS holds beyond the budget is the run
(onnxruntime's activations: 2.5x the body for the MLP) and the responses being
written. A 1 KB body pays nothing for it: decoded_request took 18.6 µs before,
18.7 µs now (in-process, median of 11 x 5000, side by side).

The estimate, measured (peak RSS above the received body, decode_request on
2-4 M items, Python 3.11, orjson 3.11, numpy 2.4) per item, an item being a
`,`, `:` or `[` of the JSON text:

    JSON floats as orjson writes them (19.6 bytes each), FP32   75
    nested [[0.5], [0.5], ...], FP32                           79
    0,0,0 (cached small ints), FP32                            26
    0.5,0.5, FP32                                              60
    10-digit ints, INT64 / 19-digit ints, UINT64               65 / 92
    strings ["a", "a", ...]  (400)                             92
    {"k": 0.5, ...} object members  (400)                      96 (6 of them text)
    one `{` per requested output {"name": "7"}                420 per `{`

so an item costs 96 bytes, a `{` 256 more, and the JSON text once more (a
64 MiB string is copied once): every case above stays under its estimate. A
binary tensor is a view of the body and costs nothing beyond it.

Blocking work stays off the event loop: inflation, counting and decoding run in
a thread when they concern more than `OFF_LOOP_BYTES` (measured: a thread hop
costs 50-90 µs, decoding 1 MiB of estimated cost 1-4 ms). Smaller bodies (an
MLP request is ~1 KB) pay neither a hop nor a lock: the budget is a plain
counter that only the event loop touches. What a thread cannot do is release the
GIL inside one C call: zlib does, but orjson.loads of 61 MiB holds it for 0.6 s,
so a small request beside such a body still waited up to 0.9 s (1.4 s with the
whole decode on the loop). Only a smaller body limit, binary tensors or decoding
in another process would shorten that; the budget bounds how many such calls
can be in flight.

Returning memory: glibc keeps freed memory in its arenas, and the decode
threads each get an arena of their own. Two things return it (glibc only; a
no-op elsewhere). `malloc_trim(0)`, in a thread a second after a share of
`TRIM_AFTER_BYTES` or more ends (one per burst, none while such a share is in
flight), returns the free pages inside every arena; but not the free top of a
thread's arena, which glibc only returns on free() above the trim threshold,
and each free of a large mmapped
block raises the mmap threshold to its size and the trim threshold to twice
that (up to 32 and 64 MiB). So `fix_malloc_thresholds` pins the mmap threshold
at its 32 MiB maximum, which stops that adjustment and keeps the trim
threshold at 128 KiB. Four bursts of four 30 MiB gzip JSON requests (two or
three answered, the rest 503) on a server at 135 MiB, RSS after each burst:
379, 400, 415, 432 MiB with neither; 274, 283, 262, 277 with the trim alone;
283, 331, 363, 334 with the pinned threshold alone; 175, 178, 181, 184 with
both. What stays is memory in use (onnxruntime's arena keeps its largest run)
and pymalloc arenas that one surviving object keeps alive. `TRIM_AFTER_BYTES`
is 4 MiB, not 16: a body under the 32 MiB threshold comes from the arenas
too, and after a burst of 32 x 15 MiB binary bodies RSS stayed +229 MiB with
16 MiB (their shares were just under it, no trim ran), +59 MiB with 4 MiB.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from bnfold.service.codec import (
    DecodedRequest,
    decode_request,
    parse_header_length,
    parse_json_object,
)
from bnfold.service.errors import (
    BadRequest,
    DecodeBudgetFull,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from bnfold.service.heap import MALLOC_TRIM
from bnfold.service.protocol import INFERENCE_HEADER
from bnfold.service.settings import MIB

OFF_LOOP_BYTES = MIB
ITEM_BYTES = 96
OBJECT_BYTES = 256
_ITEM_MARKS = (b",", b":", b"[")
_ITEM_MARKS_TOGETHER = b"".join(_ITEM_MARKS)
# deflate codes a 258-byte match in 2 bits at best: no stream inflates more than 1032-fold
MAX_DEFLATE_RATIO = 1032
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_GZIP_MAGIC = b"\x1f\x8b"
MAX_GZIP_MEMBERS = 64
_INFLATE_CHUNK = 256 * 1024
TRIM_AFTER_BYTES = 4 * MIB
TRIM_DELAY_SECONDS = 1.0

Result = TypeVar("Result")
#: A body as read: the bytes of one piece, or the buffer a longer declared body was read into.
Body = bytes | bytearray


class DecodeBudget:
    """The decode cost (estimated bytes) of the requests in flight in this process, and its limit.

    Only the event loop may touch it: a check and its update never have an
    await between them, so no lock is needed, and none may be added to the
    fast path. Each request takes a `BudgetShare` and resizes it as it learns
    more (each inflation step, then the decode estimate).
    """

    def __init__(self, limit: int, malloc_trim: Callable[[int], int] | None = MALLOC_TRIM) -> None:
        self.limit = limit
        self.in_flight = 0
        self._malloc_trim = malloc_trim
        self._trim_scheduled = False
        self._trimming: asyncio.Future[int] | None = None

    def share(self) -> BudgetShare:
        """A share for one request, released when its block ends (errors and cancellation too):
        `with budget.share() as share:`."""
        return BudgetShare(self)

    def release(self, share: BudgetShare) -> None:
        self.in_flight -= share.cost
        if share.largest >= TRIM_AFTER_BYTES:
            self._schedule_trim()

    def _schedule_trim(self) -> None:
        """Trim a second after a large share ends: its response has been sent by then, and a
        burst of large requests costs one trim, not one each."""
        if self._malloc_trim is None or self._trim_scheduled:
            return
        self._trim_scheduled = True
        asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._trim)

    def _trim(self) -> None:
        self._trim_scheduled = False
        trim = self._malloc_trim
        if trim is None or self._trimming is not None or self.in_flight >= TRIM_AFTER_BYTES:
            return  # a large request still decoding will schedule the next one when it ends
        self._trimming = asyncio.ensure_future(asyncio.to_thread(trim, 0))
        self._trimming.add_done_callback(self._trimmed)

    def _trimmed(self, _: asyncio.Future[int]) -> None:
        self._trimming = None


class BudgetShare:
    """One request's part of a `DecodeBudget`, a context manager that gives it back.

    A class rather than a generator-based context manager: this is on every request's
    path, and contextlib's machinery cost more than the budget's arithmetic.
    """

    __slots__ = ("budget", "cost", "largest")

    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.cost = 0
        self.largest = 0

    def __enter__(self) -> BudgetShare:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.budget.release(self)

    def hold(self, cost: int, what: str) -> None:
        """Hold `cost` bytes from now on: 413 above the whole budget, 503 when others hold it."""
        budget = self.budget
        if cost > budget.limit:
            raise PayloadTooLarge(
                f"{what} would take about {cost} bytes of memory, over the server's "
                f"{budget.limit}-byte decode budget (max_decode_bytes); send smaller "
                "requests, or the tensors as binary data"
            )
        others = budget.in_flight - self.cost
        if others + cost > budget.limit:
            raise DecodeBudgetFull(
                f"{what} would take about {cost} bytes of memory and the requests in flight "
                f"hold {others} of the server's {budget.limit}-byte decode budget; retry later"
            )
        budget.in_flight = others + cost
        self.cost = cost
        self.largest = max(self.largest, cost)


def decode_cost(body: Body, header_length: int | None) -> int:
    """Estimated peak bytes of `decode_request(body, header_length)`, the body included.

    Measured per item and per object (module docstring); binary tensor bytes
    after the JSON header count once, as part of the body.
    """
    json_end = len(body) if header_length is None else header_length
    if json_end <= OFF_LOOP_BYTES:  # one pass (on the loop); its copy is at most 1 MiB
        text = body if json_end == len(body) else body[:json_end]
        items = 1 + json_end - len(text.translate(None, _ITEM_MARKS_TOGETHER))
    else:  # counted in place: a copy of a large body would be memory the budget misses
        items = 1 + sum(body.count(mark, 0, json_end) for mark in _ITEM_MARKS)
    objects = body.count(b"{", 0, json_end)
    return len(body) + json_end + ITEM_BYTES * items + OBJECT_BYTES * objects


class Inflation:
    """A gzip (one or more whole members) or deflate (zlib format) body, inflated step by step.

    Steps let the caller hold memory for each one before it is taken. Every
    stream must end where it says it ends: a gzip member without its CRC-32 and
    size trailer, a deflate stream cut short, bytes after the end (other than
    another whole gzip member, as RFC 1952 allows) are a 400. All members count
    against `limit` together (413). zlib gets the input in chunks: it copies
    what is left after a member, and whole-body slices would make many small
    members quadratic. One step at a time (a thread may run it).
    """

    def __init__(self, data: Body, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        self.produced = 0
        self.done = not data  # no body at all, as before: not a stream cut short
        self._data = memoryview(data)
        self._inflater = zlib.decompressobj(_WBITS[encoding])
        self._members = 1
        self._offset = 0  # bytes of data handed to the current member's inflater
        self._pieces: list[bytes] = []

    @property
    def compressed_bytes(self) -> int:
        return len(self._data)

    def next_step(self) -> int:
        """Output bytes for the next step: doubling from `OFF_LOOP_BYTES`, within what the
        body can inflate to (deflate: 1032 times its size) and one byte over the limit."""
        most = min(self.limit + 1, MAX_DEFLATE_RATIO * len(self._data))
        return max(1, min(max(OFF_LOOP_BYTES, self.produced), most - self.produced))

    def advance(self, size: int) -> None:
        """Inflate `size` more bytes, or up to the end of the body."""
        goal = min(self.produced + size, self.limit + 1)
        while not self.done and self.produced < goal:
            chunk: bytes | memoryview = self._inflater.unconsumed_tail
            if not chunk and self._offset < len(self._data):
                chunk = self._data[self._offset : self._offset + _INFLATE_CHUNK]
                self._offset += len(chunk)
            try:  # an empty chunk drains output zlib had no room for in the last step
                piece = self._inflater.decompress(chunk, goal - self.produced)
            except zlib.error as exc:
                raise BadRequest(f"request body is not valid {self.encoding}: {exc}") from None
            self.produced += len(piece)
            if self.produced > self.limit:
                raise PayloadTooLarge(
                    f"decompressed request body is over the {self.limit}-byte limit"
                )
            self._pieces.append(piece)
            if self._inflater.eof:
                self._next_member()
            elif not chunk and not piece:
                trailer = " (a gzip member ends with its CRC-32 and size)"
                raise BadRequest(
                    f"request body is incomplete {self.encoding}: it stops before the end of "
                    f"its stream{trailer if self.encoding != 'deflate' else ''}"
                )

    def _next_member(self) -> None:
        start = self._offset - len(self._inflater.unused_data)
        if start == len(self._data):
            self.done = True
            return
        if self.encoding == "deflate" or self._data[start : start + 2] != _GZIP_MAGIC:
            trailing = len(self._data) - start
            raise BadRequest(
                f"request body has {trailing} byte{'s' if trailing > 1 else ''} of trailing "
                f"data after the end of its {self.encoding} stream"
            )
        if self._members == MAX_GZIP_MEMBERS:
            raise BadRequest(f"request body has more than {MAX_GZIP_MEMBERS} gzip members")
        self._members += 1
        self._inflater = zlib.decompressobj(_WBITS[self.encoding])
        self._offset = start

    def result(self) -> bytes:
        return b"".join(self._pieces)


async def _run(large: bool, function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` in a thread when `large`, else right here (a hop costs 50-90 µs).

    A request cancelled meanwhile releases its share while the thread finishes
    on its own; only the shutdown grace period cancels requests.
    """
    if large:
        return await asyncio.to_thread(function, *args)
    return function(*args)


_INFERENCE_FIELD = INFERENCE_HEADER.lower().encode("latin-1")


def _header(request: Request, name: bytes) -> str | None:
    """The first value of header `name` (lower case, as ASGI gives names), or None.

    Read from the scope rather than `request.headers`: Starlette's mapping raises and
    catches a KeyError for each absent field, and an inference request looks up three
    fields, two of them usually absent."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(request: Request, limit: int, share: BudgetShare) -> Body:
    """The body, its bytes held from `share` while it is read (module docstring: Reading).

    413 as soon as it exceeds `limit` (declared, streamed or inflated) or the
    whole budget; 503 when it does not fit beside the requests in flight:
    before a byte of it is read when it declares its length, as soon as it
    stops fitting when it is chunked. A compressed body holds each inflation
    step on top of its own bytes; the caller then resizes the share to the
    decode estimate, which counts the body once.
    """
    encoding = (_header(request, b"content-encoding") or "identity").strip().lower()
    if encoding not in _WBITS and encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"unsupported Content-Encoding {encoding!r}; use gzip or deflate"
        )
    declared = _header(request, b"content-length")
    if declared is None:
        body = await _read_chunked(request, limit, share)
    else:
        if not declared.isdigit():
            raise BadRequest(f"invalid Content-Length {declared!r}")
        size = int(declared)
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes is over the {limit}-byte limit")
        try:
            share.hold(size, f"reading this {size}-byte body")
        except (DecodeBudgetFull, PayloadTooLarge):
            await _discard_before_close(request, size)
            raise
        body = await _read_declared(request, size)
    if encoding not in _WBITS:
        return body
    return await _inflate(Inflation(body, encoding, limit), share)


def _closes_after(request: Request) -> bool:
    """Whether the connection closes after this request's answer (HTTP/1.0, Connection: close)."""
    if request.scope.get("http_version") == "1.0":
        return request.headers.get("connection", "").lower() != "keep-alive"
    return "close" in request.headers.get("connection", "").lower()


async def _discard_before_close(request: Request, most: int) -> None:
    """Read and drop up to `most` bytes of a refused body when the connection closes after the
    answer: closing with bytes unread sends a reset, which can destroy the answer before a
    client that sends its whole body first reads it. On a keep-alive connection uvicorn
    drops the rest itself, after the answer."""
    if not _closes_after(request):
        return
    dropped = 0
    with suppress(ClientDisconnect):
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > most:
                return


def _disconnected(received: int) -> BadRequest:
    """The client's doing (a 4xx in the metrics), not a server error."""
    return BadRequest(f"the client disconnected after {received} bytes of the request body")


async def _read_declared(request: Request, size: int) -> Body:
    """A body of `size` declared bytes: one piece as it came (a small body), else copied into
    one buffer of that size as it arrives, so it never costs more than its size and a piece."""
    whole: bytes = b""
    buffer: bytearray | None = None
    received = 0
    receive = request.receive  # not `request.stream()`: an async generator per request
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise _disconnected(received)
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        end = received + len(chunk)
        if end > size:  # httptools and h11 stop at the declared length; a guard, not a path
            raise BadRequest(f"request body is longer than its Content-Length of {size}")
        if buffer is None and not received and end == size:
            whole = chunk
        elif chunk:
            if buffer is None:
                buffer = bytearray(size)
            buffer[received:end] = chunk
        received = end
    if received != size:
        raise _disconnected(received)
    return whole if buffer is None else buffer


async def _read_chunked(request: Request, limit: int, share: BudgetShare) -> bytes:
    """A body without a declared length: each piece held as it arrives, then twice the body
    for the join (the pieces and the joined copy), then the body alone."""
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
            try:
                share.hold(received, f"reading this body ({received} bytes so far)")
            except (DecodeBudgetFull, PayloadTooLarge):
                chunks.clear()
                await _discard_before_close(request, limit - received)
                raise
            chunks.append(chunk)
    except ClientDisconnect:
        raise _disconnected(received) from None
    if len(chunks) == 1:
        return chunks[0]
    share.hold(2 * received, f"joining the {len(chunks)} pieces of this {received}-byte body")
    body = b"".join(chunks)
    chunks.clear()
    share.hold(received, f"this {received}-byte body")
    return body


async def _inflate(inflation: Inflation, share: BudgetShare) -> bytes:
    """Inflate in doubling steps, each held from `share` before it runs.

    A step holds the compressed body and twice the output so far plus the
    step: zlib builds each step's output in blocks and copies them into one
    bytes object, and the steps are joined at the end. Holding the worst case up front (1032 times
    the compressed size) would let four 100 KB gzip requests fill the budget;
    a step is cut to what the budget can hold, so a body is refused only when
    its inflated bytes themselves do not fit.
    """
    compressed = inflation.compressed_bytes
    while not inflation.done:
        room = (share.budget.limit - compressed) // 2 - inflation.produced
        step = max(1, min(inflation.next_step(), room))
        share.hold(compressed + 2 * (inflation.produced + step), "inflating this body")
        await _run(step > OFF_LOOP_BYTES, inflation.advance, step)
    return inflation.result()


def frozen(body: Body) -> bytes | memoryview:
    """`body` read-only: the arrays decoded from it are views of it and must not write to it."""
    return body if isinstance(body, bytes) else memoryview(body).toreadonly()


async def _held_body(
    request: Request, limit: int, share: BudgetShare, header_value: str | None
) -> tuple[Body, int | None]:
    """The body and its JSON header's length, its decode cost held from `share`."""
    body = await read_body(request, limit, share)
    length = parse_header_length(header_value, len(body))
    if len(body) > OFF_LOOP_BYTES:
        cost = await asyncio.to_thread(decode_cost, body, length)
    else:  # no coroutine for the common small body
        cost = decode_cost(body, length)
    share.hold(cost, "decoding this request")
    return body, length


class DecodedRequestBlock:
    """The inference request in the body, its decode cost held from `budget` until the block
    ends: the decoded arrays (and the parsed JSON they came from) live that long.

    A class for the same reason as `BudgetShare`: every inference request passes here.
    """

    __slots__ = ("_limit", "_request", "_share")

    def __init__(self, request: Request, limit: int, budget: DecodeBudget) -> None:
        self._request, self._limit = request, limit
        self._share = budget.share()

    async def __aenter__(self) -> DecodedRequest:
        share, request = self._share, self._request
        try:
            body, header_length = await _held_body(
                request, self._limit, share, _header(request, _INFERENCE_FIELD)
            )
            if share.cost > OFF_LOOP_BYTES:
                return await asyncio.to_thread(decode_request, frozen(body), header_length)
            return decode_request(frozen(body), header_length)
        except BaseException:
            share.budget.release(share)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._share.budget.release(self._share)


@asynccontextmanager
async def held_body(
    request: Request, limit: int, budget: DecodeBudget
) -> AsyncIterator[tuple[Body, int | None]]:
    """The raw body and its V2 JSON header length, the decode cost held from `budget` until
    the block ends: for endpoints that choose how to decode by what the body holds."""
    with budget.share() as share:
        yield await _held_body(request, limit, share, _header(request, _INFERENCE_FIELD))


async def run_sized(size: int, function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` off the event loop when it concerns more than `OFF_LOOP_BYTES`."""
    return await _run(size > OFF_LOOP_BYTES, function, *args)


async def read_json_object(request: Request, limit: int, budget: DecodeBudget) -> dict[str, Any]:
    """The body as one JSON object (empty: `{}`), parsed within `budget` like an inference body."""
    with budget.share() as share:
        body, _ = await _held_body(request, limit, share, None)
        return await _run(share.cost > OFF_LOOP_BYTES, parse_json_object, frozen(body))
