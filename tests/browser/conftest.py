"""Fixtures of the browser tests: the web console and /docs in a real Chromium.

Debian's chromium (/usr/bin/chromium, which `make test` installs as root) is
driven by playwright; playwright's own browser download is never used. Without
it the tests skip, except under `CI=true`, where they fail: CI must run them.

One browser serves every test here (launching takes most of a second); each
test gets a fresh context and page (`page`) whose problems fail the test at
teardown: a console error, an uncaught exception, an `alert()` or other dialog
(what a script injected through a model name would do), a failed request, a
5xx response, or any request to a host other than 127.0.0.1 (aborted: the
console and the docs must work offline). A test that provokes one on purpose
says so with `page_errors.allow("substring")`.

`console_server` is a real server (tests/service_server.py) on a copy of the
digits repository plus a copy of digits_mlp named `<img src=x onerror=alert(1)>`,
so every page that lists models shows a hostile name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    Playwright,
    Request,
    Response,
    Route,
    WebError,
    sync_playwright,
)

from bnfold.service.settings import Settings

from service_packages import copy_repository
from service_server import ADMIN_TOKEN, RunningServer, running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1280, "height": 800}
LOCAL_HOST = "127.0.0.1"
# A model directory name that is also markup: shown as HTML anywhere, it would run.
HOSTILE_MODEL = "<img src=x onerror=alert(1)>"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
UPDATE_SCREENSHOTS = "BNFOLD_UPDATE_SCREENSHOTS"
_SCREENSHOT_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
# Aborted by the page itself (a navigation, an AbortController): not a failure of the server.
_ABORTED = "net::ERR_ABORTED"

BROWSER_TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test here `browser` (before `-m` deselects), so no module can forget it."""
    for item in items:
        if BROWSER_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.browser)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Debian's chromium; the tests skip without it, or fail under CI."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = (
        f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
        "(`make test` installs it when run as root: apt-get install chromium)"
    )
    if _in_ci():
        pytest.fail(f"{reason}; CI=true never skips them")
    pytest.skip(reason)


@pytest.fixture(scope="package")
def playwright_driver() -> Iterator[Playwright]:
    """Package scope, not session: the driver's event loop and Chromium are gone before the
    rest of the suite runs."""
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(chromium_path: Path, playwright_driver: Playwright) -> Iterator[Browser]:
    """One headless Chromium for every browser test; each launch has a fresh profile."""
    chromium = playwright_driver.chromium.launch(
        executable_path=str(chromium_path), headless=True, args=list(CHROMIUM_ARGS)
    )
    yield chromium
    chromium.close()


@dataclass
class PageErrors:
    """What went wrong on a test's pages, and which of it the test expects (`allow`)."""

    problems: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    off_host: list[str] = field(default_factory=list)

    def allow(self, substring: str) -> None:
        """Expect problems containing `substring`: a console error the test provokes, or the
        one Chromium logs for every 4xx a page fetches on purpose ("Failed to load
        resource: the server responded with a status of 404 (Not Found) (<url>:)")."""
        self.allowed.append(substring)

    def unexpected(self) -> list[str]:
        return [
            problem
            for problem in self.problems
            if not any(substring in problem for substring in self.allowed)
        ]

    def watch(self, context: BrowserContext) -> None:
        """Record every problem of every page of `context` (popups included), and abort any
        request off 127.0.0.1."""
        context.on("console", self._console)
        context.on("weberror", self._web_error)
        context.on("dialog", self._dialog)
        context.on("requestfailed", self._request_failed)
        context.on("response", self._response)
        context.route("**/*", self._route)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            location = message.location
            where = f"{location.get('url', '')}:{location.get('lineNumber', '')}"
            self.problems.append(f"console error: {message.text} ({where})")

    def _web_error(self, error: WebError) -> None:
        self.problems.append(f"page error: {error.error.name}: {error.error.message}")

    def _dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"dialog {dialog.type}: {dialog.message!r}")
        dialog.dismiss()

    def _request_failed(self, request: Request) -> None:
        failure = request.failure or ""
        if failure == _ABORTED or urlsplit(request.url).hostname != LOCAL_HOST:
            return  # aborted by the page, or off-host (recorded by `_route`)
        self.problems.append(f"request failed: {request.method} {request.url}: {failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 500:
            self.problems.append(
                f"server error: {response.request.method} {response.url} -> {response.status}"
            )

    def _route(self, route: Route) -> None:
        url = route.request.url
        self.requests.append(url)
        if urlsplit(url).hostname == LOCAL_HOST:
            route.continue_()
            return
        self.off_host.append(url)
        self.problems.append(f"request off {LOCAL_HOST} (aborted): {route.request.method} {url}")
        route.abort("blockedbyclient")


@pytest.fixture()
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture()
def page(browser: Browser, page_errors: PageErrors) -> Iterator[Page]:
    """A fresh context (no cookies, no storage) and page at 1280x800; its problems, less
    those the test allowed, fail the test when it ends."""
    context = browser.new_context(
        viewport=VIEWPORT,
        locale="en-US",
        timezone_id="UTC",
        color_scheme="light",
        reduced_motion="reduce",
        service_workers="block",
    )
    context.set_default_timeout(10_000)
    page_errors.watch(context)
    try:
        new_page = context.new_page()
        yield new_page
        if not new_page.is_closed():
            new_page.wait_for_timeout(50)  # deliver the events still on their way
        unexpected = page_errors.unexpected()
    finally:
        context.close()
    assert not unexpected, "problems on the page:\n" + "\n".join(unexpected)


@pytest.fixture()
def screenshot(tmp_path: Path) -> Callable[..., Path]:
    """`screenshot(page, name)`: a PNG of the viewport, into docs/console/<name>.png when
    BNFOLD_UPDATE_SCREENSHOTS=1 (`make screenshots`), else into a temporary directory (so
    the path is exercised either way). Extra keywords go to `page.screenshot`."""
    update = os.environ.get(UPDATE_SCREENSHOTS) == "1"

    def take(page: Page, name: str, **options: Any) -> Path:
        if not _SCREENSHOT_NAME.fullmatch(name):
            raise ValueError(f"screenshot name {name!r}: lowercase letters, digits and dashes")
        directory = SCREENSHOTS if update else tmp_path
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.png"
        page.screenshot(path=str(path), animations="disabled", caret="hide", **options)
        return path

    return take


@dataclass(frozen=True)
class ConsoleServer:
    """A running server for the console: its URL, admin token and (copied) repository."""

    server: RunningServer
    token: str
    repository: Path

    @property
    def base_url(self) -> str:
        return self.server.url


def add_hostile_model(repository: Path, source: str = "digits_mlp") -> str:
    """Copy `source` to a model directory named `HOSTILE_MODEL`; the manifest names its
    directory (repository.py checks), so its name is rewritten too."""
    target = repository / HOSTILE_MODEL
    shutil.copytree(repository / source, target)
    for manifest_path in target.glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        manifest["name"] = HOSTILE_MODEL
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return HOSTILE_MODEL


def console_settings(repository: Path) -> Settings:
    """The console tests' server: admin token set, every inference request sampled for drift
    over a 60 s window (so a few demo requests move the verdict)."""
    return Settings(
        repository=repository,
        device="cpu",
        admin_token=ADMIN_TOKEN,
        drift_sample_fraction=1.0,
        drift_window_seconds=60,
    )


@pytest.fixture(scope="module")
def console_server(
    digits_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleServer]:
    """A server per test module (tests may load, unload, recalibrate): the digits models and
    the hostile one, admin token set, every inference request sampled for drift over 60 s."""
    repository = copy_repository(
        digits_repository, tmp_path_factory.mktemp("console") / "repository"
    )
    add_hostile_model(repository)
    with running_server(console_settings(repository)) as server:
        ready = httpx.get(f"{server.url}/v2/models/{quote(HOSTILE_MODEL, safe='')}/ready")
        assert ready.status_code == 200, ready.text
        yield ConsoleServer(server, ADMIN_TOKEN, repository)
