"""/docs in Chromium: Swagger UI from the vendored files renders every operation and calls the
API, offline and under the Content-Security-Policy; and the page guard itself (conftest.py)
catches what it promises to, so a clean run of the console's tests means something.

The HTTP side of hosting (headers, caching, traversal, the console setting) is
tests/test_console_hosting.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page

from bnfold.service.console.hosting import DOCS_ASSETS_PATH

from .conftest import LOCAL_HOST, ConsoleServer, PageErrors

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _operations(base_url: str) -> list[tuple[str, str]]:
    """(method, path) of every operation in the served OpenAPI document."""
    schema = httpx.get(f"{base_url}/openapi.json").raise_for_status().json()
    return [
        (method, path)
        for path, item in schema["paths"].items()
        for method in item
        if method in HTTP_METHODS
    ]


def _open_docs(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/docs")
    page.locator(".opblock").first.wait_for()


def test_docs_render_every_operation_from_local_files_only(
    page: Page,
    page_errors: PageErrors,
    console_server: ConsoleServer,
    screenshot: Callable[..., Path],
) -> None:
    base_url = console_server.base_url
    operations = _operations(base_url)
    info = httpx.get(f"{base_url}/openapi.json").json()["info"]
    _open_docs(page, base_url)
    assert page.locator(".opblock").count() == len(operations)
    for method, path in operations:
        block = page.locator(f".opblock-{method}").filter(
            has=page.locator(".opblock-summary-path", has_text=path)
        )
        assert block.count() >= 1, (method, path)
    title = page.locator(".information-container .title").inner_text()
    assert info["title"] in title and info["version"] in title
    assert page.title() == f"{info['title']} API docs"
    loaded = {urlsplit(url).path for url in page_errors.requests}
    assert {
        "/docs",
        "/docs/docs-init.js",
        f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
        f"{DOCS_ASSETS_PATH}/swagger-ui.css",
        "/openapi.json",
    } <= loaded
    assert all(urlsplit(url).hostname == LOCAL_HOST for url in page_errors.requests)
    assert page_errors.off_host == []
    screenshot(page, "api-docs")


def test_try_it_out_calls_the_api_from_the_page(page: Page, console_server: ConsoleServer) -> None:
    """connect-src 'self' lets Swagger UI's requests through: the model metadata it shows is
    what the API answers."""
    base_url = console_server.base_url
    expected = httpx.get(f"{base_url}/v2/models/digits_mlp").raise_for_status().json()
    _open_docs(page, base_url)
    operation = page.locator(".opblock-get").filter(
        has=page.get_by_text("/v2/models/{model_name}", exact=True)
    )
    operation.locator(".opblock-summary-control").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.locator("input[placeholder='model_name']").fill("digits_mlp")
    operation.get_by_role("button", name="Execute").click()
    live = operation.locator(".live-responses-table .response")
    live.first.wait_for()
    assert live.locator(".response-col_status").first.inner_text().strip() == "200"
    body = live.locator(".response-col_description pre.microlight").first.inner_text()
    assert json.loads(body) == expected


def test_the_content_security_policy_blocks_inline_handlers_and_other_origins(
    page: Page, page_errors: PageErrors, console_server: ConsoleServer
) -> None:
    """Markup injected into the page cannot run script, and the page cannot connect
    elsewhere; both violations reach the page guard as console errors."""
    _open_docs(page, console_server.base_url)
    page.evaluate(
        """document.body.insertAdjacentHTML(
            "beforeend", '<img id="probe" src="data:," onerror="window.injected = 1">')"""
    )
    page.wait_for_function("document.getElementById('probe').complete")
    outcome = page.evaluate(
        "fetch('http://198.51.100.7/steal').then(() => 'sent', error => error.name)"
    )
    assert outcome == "TypeError"
    assert page.evaluate("window.injected") is None
    problems = page_errors.unexpected()
    assert any("inline event handler" in problem for problem in problems), problems
    assert any("connect-src 'self'" in problem for problem in problems), problems
    assert page_errors.off_host == []  # the policy stopped it before any request
    page_errors.allow("Content Security Policy")


def test_the_page_guard_aborts_requests_off_127_0_0_1(
    page: Page, page_errors: PageErrors, console_server: ConsoleServer
) -> None:
    """A request the policy does not cover (a navigation) is aborted by the guard and
    recorded; `localhost` counts as another host."""
    port = urlsplit(console_server.base_url).port
    for url in ("http://198.51.100.7/", f"http://localhost:{port}/docs"):
        with pytest.raises(PlaywrightError, match="ERR_BLOCKED_BY_CLIENT"):
            page.goto(url)
    assert page_errors.off_host == ["http://198.51.100.7/", f"http://localhost:{port}/docs"]
    assert len(page_errors.unexpected()) == 2
    page_errors.allow(f"request off {LOCAL_HOST}")


def test_the_page_guard_records_console_errors_exceptions_and_dialogs(
    page: Page, page_errors: PageErrors, console_server: ConsoleServer
) -> None:
    """What a script injected through a model name would do (alert), an uncaught
    exception, a console error: each is recorded until the test allows it."""
    _open_docs(page, console_server.base_url)
    page.evaluate("console.error('deliberate console error')")
    page.evaluate("alert('deliberate alert')")
    page.evaluate("setTimeout(() => { throw new Error('deliberate exception') }, 0)")
    deadline = time.monotonic() + 5
    while len(_deliberate(page_errors)) < 3 and time.monotonic() < deadline:
        page.wait_for_timeout(20)  # events are delivered while playwright waits
    deliberate = _deliberate(page_errors)
    assert len(deliberate) == 3, deliberate
    assert deliberate[0].startswith("console error: deliberate console error (")
    assert deliberate[1:] == [
        "dialog alert: 'deliberate alert'",
        "page error: Error: deliberate exception",
    ]
    page_errors.allow("deliberate")
    assert page_errors.unexpected() == []


def _deliberate(page_errors: PageErrors) -> list[str]:
    return [problem for problem in page_errors.unexpected() if "deliberate" in problem]
