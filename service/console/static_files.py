"""Static files served from memory: a directory indexed once, answered by relative path.

A request path is only ever a key of the index, never joined onto the
filesystem, so no path (`../`, `%2e%2e`, an absolute path, a symlink) can
reach a file outside the indexed directory: what was not indexed does not
exist. Files whose suffix is not in `MEDIA_TYPES`, and hidden files, are not
indexed (VENDORED.md, a LICENSE without a suffix, an editor's swap file).

Each file carries a strong ETag (its sha256), so a client revalidates with
`If-None-Match` and gets 304 without the body. Text files are also offered
gzip-compressed, compressed on first request (in a thread: the Swagger UI
bundle takes ~40 ms) rather than at app creation, which every test server pays.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

MEDIA_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".json": "application/json",
        ".ico": "image/x-icon",
        ".txt": "text/plain; charset=utf-8",
        ".woff2": "font/woff2",
    }
)
# Formats that are already compressed (png, ico, woff2) are sent as they are.
_COMPRESSIBLE: Final = frozenset({".html", ".js", ".css", ".svg", ".json", ".txt"})
# Below this a gzip header and a round trip cost more than the bytes saved.
_GZIP_MIN_BYTES: Final = 1024


_NOT_COMPRESSED_YET: Final = object()


class StaticFile:
    """One file's bytes, media type and strong ETag (its sha256)."""

    __slots__ = ("_gzipped", "body", "compressible", "etag", "media_type")

    def __init__(self, body: bytes, media_type: str, *, compressible: bool) -> None:
        self.body = body
        self.media_type = media_type
        self.compressible = compressible and len(body) >= _GZIP_MIN_BYTES
        self.etag = f'"{hashlib.sha256(body).hexdigest()}"'
        self._gzipped: object = _NOT_COMPRESSED_YET

    @property
    def gzip_etag(self) -> str:
        """The gzip representation's own strong ETag (RFC 9110: a strong validator differs
        between representations of the same resource)."""
        return f'{self.etag[:-1]}.gz"'

    async def gzipped(self) -> bytes | None:
        """The body gzip-compressed, or None when that does not pay. Compressed once, in a
        thread; two requests racing for the first copy both compute the same bytes (mtime 0)."""
        if self._gzipped is _NOT_COMPRESSED_YET:
            self._gzipped = await asyncio.to_thread(self._compress)
        return self._gzipped  # type: ignore[return-value]

    def _compress(self) -> bytes | None:
        if not self.compressible:
            return None
        compressed = gzip.compress(self.body, compresslevel=6, mtime=0)
        return compressed if len(compressed) < len(self.body) else None


def index_directory(root: Traversable) -> dict[str, StaticFile]:
    """Every servable file under `root`, by its path relative to `root` with `/` separators.

    `root` is a `Traversable` (`importlib.resources.files(...)`), so this works
    from a wheel, a zip or a source checkout alike.
    """
    return {
        relative: StaticFile(
            body=resource.read_bytes(),
            media_type=MEDIA_TYPES[suffix],
            compressible=suffix in _COMPRESSIBLE,
        )
        for relative, resource in _walk(root, "")
        if (suffix := _suffix(relative)) in MEDIA_TYPES
    }


def _walk(directory: Traversable, prefix: str) -> Iterator[tuple[str, Traversable]]:
    for entry in sorted(directory.iterdir(), key=lambda item: item.name):
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir():
            yield from _walk(entry, f"{prefix}{entry.name}/")
        elif entry.is_file():
            yield f"{prefix}{entry.name}", entry


def _suffix(relative: str) -> str:
    name = relative.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _accepts_gzip(request: Request) -> bool:
    """Whether `Accept-Encoding` lists gzip without `q=0`."""
    for coding in request.headers.get("accept-encoding", "").split(","):
        name, *parameters = (part.strip().lower() for part in coding.split(";"))
        if name != "gzip":
            continue
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def _matches(if_none_match: str, etags: tuple[str, ...]) -> str | None:
    """The ETag of `etags` that `If-None-Match` names (weak comparison, RFC 9110 13.1.2), if any."""
    if if_none_match.strip() == "*":
        return etags[0]
    named = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return next((etag for etag in etags if etag in named), None)


async def file_response(
    request: Request, static: StaticFile, headers: Mapping[str, str]
) -> Response:
    """`static` for `request`: 304 when the client's copy is current (either representation:
    the content is the same), else the body, gzip-compressed when the client takes it.

    `headers` (caching, security) go on every response, 304 included.
    """
    response_headers = {**headers, "Vary": "Accept-Encoding"}
    current = _matches(request.headers.get("if-none-match", ""), (static.etag, static.gzip_etag))
    if current is not None:
        return Response(status_code=304, headers={**response_headers, "ETag": current})
    if static.compressible and _accepts_gzip(request):
        gzipped = await static.gzipped()
        if gzipped is not None:
            response_headers.update({"ETag": static.gzip_etag, "Content-Encoding": "gzip"})
            return Response(gzipped, media_type=static.media_type, headers=response_headers)
    response_headers["ETag"] = static.etag
    return Response(static.body, media_type=static.media_type, headers=response_headers)
