"""The routes that host the web console (/ui), the offline API docs (/docs) and `/`.

The console is static files (static/) that call the public API like any
client; the docs page is Swagger UI from vendor/swagger-ui/ (VENDORED.md),
started by static/docs-init.js. Both are read once, when the app is created
(`ConsoleFiles.load`), and answered from memory (static_files.py): request
paths are looked up, never joined onto the filesystem.

Every /ui and /docs response carries the security headers: a
Content-Security-Policy that allows no inline script or style and no other
origin, so a model name such as `<img src=x onerror=...>` that the console
might ever put into the page as HTML still cannot run, and nothing the pages
load can leave the server. Console files revalidate on every load (`no-cache`
with their ETag), so an upgrade applies at once; Swagger UI's files sit under a
path naming their version and are cached for a year.

None of these routes are in the OpenAPI document, and none count as inference
in the metrics (metrics are tracked by the inference routes themselves).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bnfold.service.console.static_files import StaticFile, file_response, index_directory
from bnfold.service.errors import NotFound
from bnfold.service.rest.responses import json_response

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

# The vendored swagger-ui-dist (vendor/swagger-ui/VENDORED.md); it names the assets' path.
SWAGGER_UI_VERSION: Final = "5.35.0"
DOCS_ASSETS_PATH: Final = f"/docs/assets/swagger-ui-{SWAGGER_UI_VERSION}"
CONSOLE_OFF: Final = "the web console is off (BNFOLD_CONSOLE=false)"

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
# Swagger UI renders under the same policy as the console: it sets styles through the DOM,
# which style-src does not restrict (tests/browser/test_api_docs.py: no violation reported).
SECURITY_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
)
REVALIDATE: Final = "no-cache"
IMMUTABLE: Final = "public, max-age=31536000, immutable"

_DOCS_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} API docs</title>
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="docs/docs-init.js"></script>
</body>
</html>
"""


class ConsoleFilesMissing(RuntimeError):
    """The installation lacks a file the pages need: a packaging bug, found at app creation."""


@dataclass(frozen=True)
class ConsoleFiles:
    """The console's files (static/), Swagger UI's (vendor/swagger-ui/) and the docs page."""

    console: Mapping[str, StaticFile]
    swagger_ui: Mapping[str, StaticFile]
    docs_page: StaticFile

    @classmethod
    def load(cls, title: str, package: Traversable | None = None) -> ConsoleFiles:
        """Read every file of static/ and vendor/swagger-ui/ (a few MB, a few ms) of
        `package`, by default this one's, wherever it is installed (a wheel, a checkout).

        The docs page's URLs are relative (`docs/assets/...` from `/docs`), so
        it also works behind a proxy that serves the app under a path prefix.
        """
        if package is None:
            package = files(__package__ or "bnfold.service.console")
        console = index_directory(package / "static")
        swagger_ui = index_directory(package / "vendor" / "swagger-ui")
        needed = (
            ("static", console, "index.html"),
            ("static", console, "docs-init.js"),
            ("vendor/swagger-ui", swagger_ui, "swagger-ui-bundle.js"),
            ("vendor/swagger-ui", swagger_ui, "swagger-ui.css"),
        )
        missing = [f"{folder}/{name}" for folder, index, name in needed if name not in index]
        if missing:
            raise ConsoleFilesMissing(
                f"bnfold.service.console is missing {', '.join(missing)}: reinstall bnfold"
            )
        page = _DOCS_PAGE.format(title=title, assets=DOCS_ASSETS_PATH.lstrip("/"))
        return cls(
            console=MappingProxyType(console),
            swagger_ui=MappingProxyType(swagger_ui),
            docs_page=StaticFile(page.encode(), "text/html; charset=utf-8", compressible=False),
        )


def console_routes(console_files: ConsoleFiles, *, enabled: bool) -> APIRouter:
    """`/` and `/ui/...`: the console when `enabled`, else a 404 naming the setting (and `/`
    pointing at the API)."""
    router = APIRouter(include_in_schema=False)
    headers = {**SECURITY_HEADERS, "Cache-Control": REVALIDATE}

    @router.api_route("/", methods=["GET", "HEAD"])
    async def root() -> Response:
        if enabled:
            return RedirectResponse("/ui/", status_code=307)
        return json_response({"name": "bnfold", "api": "/v2", "docs": "/docs"})

    @router.api_route("/ui", methods=["GET", "HEAD"])
    async def console_bare() -> Response:
        if not enabled:
            raise NotFound(CONSOLE_OFF, headers=dict(SECURITY_HEADERS))
        return RedirectResponse("/ui/", status_code=307, headers=dict(SECURITY_HEADERS))

    @router.api_route("/ui/{path:path}", methods=["GET", "HEAD"])
    async def console_file(request: Request, path: str) -> Response:
        if not enabled:
            raise NotFound(CONSOLE_OFF, headers=dict(SECURITY_HEADERS))
        static = console_files.console.get(path or "index.html")
        if static is None:
            raise NotFound(f"no console file /ui/{path}", headers=dict(SECURITY_HEADERS))
        return await file_response(request, static, headers)

    return router


def docs_routes(console_files: ConsoleFiles) -> APIRouter:
    """`/docs`: Swagger UI on `/openapi.json`, from the vendored files; on whatever the
    console setting."""
    router = APIRouter(include_in_schema=False)
    page_headers = {**SECURITY_HEADERS, "Cache-Control": REVALIDATE}
    asset_headers = {**SECURITY_HEADERS, "Cache-Control": IMMUTABLE}
    init_script = console_files.console["docs-init.js"]

    @router.api_route("/docs", methods=["GET", "HEAD"])
    async def docs_page(request: Request) -> Response:
        return await file_response(request, console_files.docs_page, page_headers)

    @router.api_route("/docs/docs-init.js", methods=["GET", "HEAD"])
    async def docs_init(request: Request) -> Response:
        return await file_response(request, init_script, page_headers)

    @router.api_route(f"{DOCS_ASSETS_PATH}/{{path:path}}", methods=["GET", "HEAD"])
    async def docs_asset(request: Request, path: str) -> Response:
        static = console_files.swagger_ui.get(path)
        if static is None:
            raise NotFound(
                f"no docs asset {DOCS_ASSETS_PATH}/{path}", headers=dict(SECURITY_HEADERS)
            )
        return await file_response(request, static, asset_headers)

    return router
