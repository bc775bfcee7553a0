"""Hosting the web console (/ui) and the offline API docs (/docs) over HTTP: files, caching,
security headers, traversal, the console setting, packaging.

Expected bodies and ETags are computed from the files on disk (hashlib), never
taken from a response. What the pages do in a browser is tests/browser/.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families

from bnfold.cli import app as cli_app
from bnfold.service import serve_cli
from bnfold.service.console.hosting import (
    CONSOLE_OFF,
    DOCS_ASSETS_PATH,
    SWAGGER_UI_VERSION,
    ConsoleFiles,
    ConsoleFilesMissing,
)
from bnfold.service.console.static_files import index_directory
from bnfold.service.settings import Settings

from service_server import RunningServer, running_server

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = ROOT / "service" / "console"
STATIC = CONSOLE / "static"
SWAGGER_UI = CONSOLE / "vendor" / "swagger-ui"
# The policy of the issue, written out here rather than imported: the test pins the header.
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY = {
    "content-security-policy": POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
IMMUTABLE = "public, max-age=31536000, immutable"
IDENTITY = {"Accept-Encoding": "identity"}


def sha256_etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()}"'


@pytest.fixture()
def client(service: RunningServer) -> Iterator[httpx.Client]:
    """The shared test server (console on by default)."""
    with httpx.Client(base_url=service.url, timeout=30, headers=IDENTITY) as http:
        yield http


@pytest.fixture(scope="module")
def console_off(service_repository: Path) -> Iterator[RunningServer]:
    settings = Settings(repository=service_repository, device="cpu", console=False)
    with running_server(settings) as server:
        yield server


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY.items():
        assert response.headers.get(name) == value, (response.url, name)


# ---------------------------------------------------------------- the docs page


def test_docs_page_loads_only_local_files_and_has_no_inline_code(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    html = page.text
    assert "<style" not in html and " style=" not in html and "http" not in html
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.DOTALL)
    assert len(scripts) == 2
    assert all(" src=" in attributes and not content for attributes, content in scripts)
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert references == [
        f"{DOCS_ASSETS_PATH[1:]}/favicon-32x32.png",
        f"{DOCS_ASSETS_PATH[1:]}/swagger-ui.css",
        f"{DOCS_ASSETS_PATH[1:]}/swagger-ui-bundle.js",
        "docs/docs-init.js",
    ]
    on_disk = {
        "favicon-32x32.png": ("image/png", SWAGGER_UI),
        "swagger-ui.css": ("text/css; charset=utf-8", SWAGGER_UI),
        "swagger-ui-bundle.js": ("text/javascript; charset=utf-8", SWAGGER_UI),
        "docs-init.js": ("text/javascript; charset=utf-8", STATIC),
    }
    for reference in references:
        response = client.get(f"/{reference}")  # relative to /docs: from the root
        media_type, folder = on_disk[reference.rsplit("/", 1)[1]]
        assert response.status_code == 200, reference
        assert response.headers["content-type"] == media_type
        assert response.content == (folder / reference.rsplit("/", 1)[1]).read_bytes()


def test_docs_init_script_starts_swagger_ui_on_the_openapi_document() -> None:
    script = (STATIC / "docs-init.js").read_text()
    assert "SwaggerUIBundle(" in script
    assert 'url: "openapi.json"' in script and 'dom_id: "#swagger-ui"' in script
    assert "validatorUrl: null" in script  # else a badge image from validator.swagger.io


def test_the_framework_docs_are_gone(client: httpx.Client) -> None:
    """FastAPI's own /docs loads Swagger UI from a CDN; ReDoc and the OAuth2 redirect page
    (inline script, no OAuth here) are not served."""
    for path in ("/redoc", "/docs/oauth2-redirect"):
        response = client.get(path)
        assert response.status_code == 404
        assert "error" in response.json()
    assert "cdn.jsdelivr.net" not in client.get("/docs").text


def test_vendored_files_match_vendored_md() -> None:
    """VENDORED.md names the version the code serves under and each file's sha256."""
    notes = (SWAGGER_UI / "VENDORED.md").read_text()
    assert f"version **{SWAGGER_UI_VERSION}**" in notes
    assert f"swagger-ui-dist-{SWAGGER_UI_VERSION}.tgz" in notes
    listed = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", notes, re.MULTILINE))
    vendored = {path.name for path in SWAGGER_UI.iterdir()} - {"VENDORED.md"}
    assert set(listed) == vendored
    for name, digest in listed.items():
        assert hashlib.sha256((SWAGGER_UI / name).read_bytes()).hexdigest() == digest, name


# ---------------------------------------------------------------- caching and encoding


@pytest.mark.parametrize(
    ("url", "file", "cache_control"),
    [
        ("/ui/", STATIC / "index.html", "no-cache"),
        ("/ui/index.html", STATIC / "index.html", "no-cache"),
        ("/ui/docs-init.js", STATIC / "docs-init.js", "no-cache"),
        ("/docs/docs-init.js", STATIC / "docs-init.js", "no-cache"),
        (f"{DOCS_ASSETS_PATH}/swagger-ui.css", SWAGGER_UI / "swagger-ui.css", IMMUTABLE),
        (
            f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            SWAGGER_UI / "swagger-ui-bundle.js",
            IMMUTABLE,
        ),
        (f"{DOCS_ASSETS_PATH}/favicon-32x32.png", SWAGGER_UI / "favicon-32x32.png", IMMUTABLE),
    ],
)
def test_files_carry_their_sha256_etag_and_revalidate_with_304(
    client: httpx.Client, url: str, file: Path, cache_control: str
) -> None:
    body = file.read_bytes()
    etag = sha256_etag(body)
    response = client.get(url)
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == cache_control
    assert_security_headers(response)
    for if_none_match in (etag, f"W/{etag}", f'"stale", {etag}', "*"):
        cached = client.get(url, headers={"If-None-Match": if_none_match})
        assert cached.status_code == 304, if_none_match
        assert cached.content == b""
        assert cached.headers["etag"] == etag
        assert cached.headers["cache-control"] == cache_control
        assert_security_headers(cached)
    stale = client.get(url, headers={"If-None-Match": sha256_etag(b"an older version")})
    assert stale.status_code == 200 and stale.content == body
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == etag and head.headers["content-length"] == str(len(body))


def test_the_docs_page_revalidates_too(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["etag"] == sha256_etag(page.content)
    cached = client.get("/docs", headers={"If-None-Match": page.headers["etag"]})
    assert cached.status_code == 304


def test_text_files_are_gzipped_for_clients_that_take_it(client: httpx.Client) -> None:
    bundle = (SWAGGER_UI / "swagger-ui-bundle.js").read_bytes()
    url = f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js"
    for accept in ("gzip", "br, gzip;q=0.5", "deflate, GZIP"):
        with client.stream("GET", url, headers={"Accept-Encoding": accept}) as response:
            raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip", accept
        assert response.headers["vary"] == "Accept-Encoding"
        assert gzip.decompress(raw) == bundle
        assert len(raw) < len(bundle) / 2
        gzip_etag = response.headers["etag"]
        assert gzip_etag != sha256_etag(bundle) and gzip_etag.startswith(sha256_etag(bundle)[:-1])
        revalidated = client.get(
            url, headers={"Accept-Encoding": accept, "If-None-Match": gzip_etag}
        )
        assert revalidated.status_code == 304
    for accept in ("identity", "gzip;q=0", "br"):
        response = client.get(url, headers={"Accept-Encoding": accept})
        assert "content-encoding" not in response.headers, accept
        assert response.content == bundle
    png = client.get(f"{DOCS_ASSETS_PATH}/favicon-32x32.png", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in png.headers  # already compressed


# ---------------------------------------------------------------- paths


TRAVERSALS = [
    "/ui/..%2fhosting.py",
    "/ui/..%2F..%2Fsettings.py",
    "/ui/%2e%2e/hosting.py",
    "/ui/%2e%2e%2f%2e%2e%2fsettings.py",
    "/ui/..%5chosting.py",
    "/ui/%252e%252e%252fhosting.py",
    "/ui/%2fetc%2fpasswd",
    "/ui/.%2e/.%2e/__init__.py",
    "/ui/js/..%2f..%2fhosting.py",
    f"{DOCS_ASSETS_PATH}/..%2f..%2f..%2fsettings.py",
    f"{DOCS_ASSETS_PATH}/VENDORED.md",
    f"{DOCS_ASSETS_PATH}/LICENSE",
    "/ui/hosting.py",
    "/ui/__init__.py",
    "/ui/nothing-here.js",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_outside_the_index_are_404_json(client: httpx.Client, path: str) -> None:
    """Percent-encoded dots and slashes, files next to the served ones, files present on disk
    but not indexed (VENDORED.md, LICENSE): nothing but an indexed file is ever answered."""
    response = client.get(httpx.URL(client.base_url.join("/")).copy_with(raw_path=path.encode()))
    assert response.status_code == 404, path
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error", "request_id"}
    assert_security_headers(response)


@pytest.mark.parametrize(
    "raw_path",
    [
        "/ui/../service/console/hosting.py",
        "/ui/../../settings.py",
        "/ui/./../hosting.py",
        f"{DOCS_ASSETS_PATH}/../../../settings.py",
        "/ui/..\\hosting.py",
    ],
)
def test_literal_dot_segments_are_404_json(service: RunningServer, raw_path: str) -> None:
    """Sent as written on a raw socket (clients remove `..` segments before sending)."""
    request = f"GET {raw_path} HTTP/1.1\r\nHost: {service.address}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((service.host, service.port), timeout=10) as connection:
        connection.sendall(request.encode())
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert body.startswith(b'{"error":')


def test_ui_redirects_to_the_console_and_the_root_to_ui(client: httpx.Client) -> None:
    for path in ("/", "/ui"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 307, path
        assert response.headers["location"] == "/ui/"
    assert client.get("/", follow_redirects=True).url.path == "/ui/"


def test_console_and_docs_routes_are_not_in_the_openapi_document(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith(("/ui", "/docs"))]


def _request_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("bnfold_request")
        for sample in family.samples
    }


def test_console_and_docs_requests_are_not_counted_as_inference(client: httpx.Client) -> None:
    before = _request_samples(client)
    for path in ("/", "/ui", "/ui/", "/ui/missing.js", "/docs", "/docs/docs-init.js"):
        client.get(path)
    client.get(f"{DOCS_ASSETS_PATH}/swagger-ui.css")
    assert _request_samples(client) == before


# ---------------------------------------------------------------- the console setting


def test_console_off_answers_404_naming_the_setting(console_off: RunningServer) -> None:
    with httpx.Client(base_url=console_off.url, headers=IDENTITY) as http:
        for path in ("/ui", "/ui/", "/ui/index.html", "/ui/docs-init.js", "/ui/no-such-file"):
            response = http.get(path, follow_redirects=False)
            assert response.status_code == 404, path
            assert response.json()["error"] == CONSOLE_OFF
            assert_security_headers(response)
        assert CONSOLE_OFF == "the web console is off (BNFOLD_CONSOLE=false)"
        root = http.get("/", follow_redirects=False)
        assert root.status_code == 200
        assert root.json() == {"name": "bnfold", "api": "/v2", "docs": "/docs"}
        docs = http.get("/docs")
        assert docs.status_code == 200 and "swagger-ui" in docs.text
        assert http.get("/docs/docs-init.js").status_code == 200
        assert http.get(f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200


def test_console_is_a_setting_with_an_option_and_a_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().console is True
    monkeypatch.setenv("BNFOLD_CONSOLE", "false")
    assert Settings().console is False
    monkeypatch.delenv("BNFOLD_CONSOLE")
    group = typer.main.get_command(cli_app)
    assert isinstance(group, typer.core.TyperGroup)
    serve = group.commands["serve"]
    option = next(parameter for parameter in serve.params if parameter.name == "console")
    assert option.opts == ["--console"] and option.secondary_opts == ["--no-console"]
    for arguments, expected in ((["--no-console"], False), (["--console"], True), ([], True)):
        context = serve.make_context("serve", list(arguments))
        assert serve_cli.settings_from_options(context.params).console is expected, arguments


# ---------------------------------------------------------------- files and packaging


def test_index_skips_hidden_files_and_unknown_suffixes(tmp_path: Path) -> None:
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "app.js").write_bytes(b"export {};\n")
    (tmp_path / "index.html").write_bytes(b"<!doctype html>")
    (tmp_path / "notes.md").write_text("not served")
    (tmp_path / "LICENSE").write_text("not served")
    (tmp_path / ".secret.js").write_text("not served")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.json").write_text("{}")
    index = index_directory(tmp_path)
    assert sorted(index) == ["index.html", "js/app.js"]
    assert index["js/app.js"].media_type == "text/javascript; charset=utf-8"
    assert index["js/app.js"].etag == sha256_etag(b"export {};\n")


def test_missing_files_fail_at_app_creation(tmp_path: Path) -> None:
    shutil.copytree(CONSOLE / "vendor", tmp_path / "vendor")
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "index.html").write_text("<!doctype html>")
    with pytest.raises(ConsoleFilesMissing, match=r"static/docs-init\.js"):
        ConsoleFiles.load("bnfold", tmp_path)


def test_the_installed_package_holds_the_console() -> None:
    package = files("bnfold.service.console")
    for relative in (
        "static/index.html",
        "static/docs-init.js",
        "vendor/swagger-ui/swagger-ui-bundle.js",
        "vendor/swagger-ui/swagger-ui.css",
    ):
        assert package.joinpath(*relative.split("/")).is_file(), relative


def test_the_wheel_holds_every_console_file(tmp_path: Path) -> None:
    """Built from a copy of the sources (the checkout gets no build/ directory), with the
    environment's setuptools (no network): every file under static/ and vendor/ is in it."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "repository", ".cache")
    for name in ("core", "convert", "service", "models"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    build = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("-w", str(tmp_path / "dist"), str(source)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("bnfold-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {
            name for name in archive.namelist() if name.startswith("bnfold/service/console/")
        }
    expected = {
        f"bnfold/service/console/{path.relative_to(CONSOLE).as_posix()}"
        for folder in (STATIC, CONSOLE / "vendor")
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected <= packaged, sorted(expected - packaged)
    assert "bnfold/service/console/hosting.py" in packaged


def test_docs_links_resolve_from_the_docs_url(client: httpx.Client) -> None:
    """The page's relative URLs resolve, from /docs, to the routes (as a browser resolves
    them): the docs need no absolute path and work under a proxy's prefix."""
    base = client.base_url.join("/docs")
    for reference in re.findall(r'(?:src|href)="([^"]+)"', client.get("/docs").text):
        assert client.get(base.join(reference)).status_code == 200, reference
        assert urlsplit(str(base.join(reference))).path.startswith("/docs/")
