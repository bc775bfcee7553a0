"""The web console in a real Chromium against a real server: every page, as a user drives it.

The console is a view of the public API, so what a page shows is checked
against what the API answers (httpx) or what the package on disk says (its
manifest.json, read here); the numbers themselves are the API's and are tested
in the service tests. The page fixture fails a test on any console error,
uncaught exception, dialog (an injected `alert(1)` would be one), 5xx, or
request that leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from playwright.sync_api import Page, expect
from torch import nn

from bnfold.service.settings import Settings

from .conftest import (
    HOSTILE_MODEL,
    ConsoleServer,
    PageErrors,
    add_hostile_model,
    console_settings,
)
from convert_helpers import calibrated, convert_module
from service_packages import copy_repository
from service_server import ADMIN_TOKEN, running_server

DEMO = Path(__file__).resolve().parents[2] / "service" / "console" / "static" / "demo"
KEPT_MODEL = "kept_bn"
# the recalibration test's model; no other test sends it traffic
DRIFT_MODEL = "digits_conv1d"


class KeptBatchNorm(nn.Module):
    """conv → ReLU → BN → zero-padded conv: the BN has no foldable neighbour, so it is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.relu(self.conv(x))))


@pytest.fixture(scope="module")
def console(
    digits_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleServer]:
    """The digits models, the hostile name and a package with a kept BN, drift sampled at 1."""
    repository = copy_repository(digits_repository, tmp_path_factory.mktemp("console") / "repo")
    add_hostile_model(repository)
    shape = (2, 1, 6, 6)
    convert_module(calibrated(KeptBatchNorm(), shape), shape, repository, name=KEPT_MODEL)
    with running_server(console_settings(repository)) as server:
        yield ConsoleServer(server, ADMIN_TOKEN, repository)


def open_page(page: Page, console: ConsoleServer, fragment: str = "#/") -> None:
    page.goto(f"{console.base_url}/ui/{fragment}")
    expect(page.locator("main .page")).not_to_have_attribute("aria-busy", "true")


def manifest(console: ConsoleServer, name: str, version: int = 1) -> dict:
    return json.loads((console.repository / name / str(version) / "manifest.json").read_text())


def demo_pixels(contrast: float = 1.0, brightness: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The shipped demo digits in [0, 1] under a shift, as numpy computes it: (N, 64), labels."""
    demo = json.loads((DEMO / "digits.json").read_text())
    pixels = np.asarray(demo["pixels"], dtype=np.float32) / demo["pixel_max"]
    return np.clip(pixels * contrast + brightness, 0, 1).astype(np.float32), np.asarray(
        demo["labels"]
    )


def first_bar_value(page: Page) -> float:
    return float(page.locator("#compare-result svg.bars g.bar .value").first.text_content())


def test_repository_page_lists_every_version_and_renders_a_hostile_name_as_text(
    page: Page, console: ConsoleServer, screenshot: Callable[..., Path]
) -> None:
    index = httpx.post(f"{console.base_url}/v2/repository/index", json={}).json()
    open_page(page, console)
    table = page.locator("#repository-table")
    for entry in index:
        row = table.locator(f'tr[data-model="{entry["name"]}"][data-version="{entry["version"]}"]')
        expect(row).to_have_count(1)
        expect(row.locator(".badge")).to_have_text(entry["state"])
        metadata = httpx.get(f"{console.base_url}/v2/models/{quote(entry['name'], safe='')}").json()
        expect(row).to_contain_text(", ".join(metadata["parameters"]["execution_providers"]))
    # the name is on the page as its characters; no <img> was created, nothing ran
    expect(page.get_by_role("link", name=HOSTILE_MODEL, exact=True)).to_have_count(1)
    assert page.locator("main img, main svg[onload]").count() == 0
    # admin actions need the token
    expect(table.get_by_role("button", name="Unload").first).to_be_disabled()
    screenshot(page, "repository")


def test_unload_and_load_with_the_admin_token(page: Page, console: ConsoleServer) -> None:
    model = "digits_mobilenet"
    base = console.base_url
    open_page(page, console)
    page.fill("#admin-token", console.token)
    page.click("#token-form button[type=submit]")
    row = page.locator(f'tr[data-model="{model}"]')
    row.get_by_role("button", name="Unload").click()
    expect(page.get_by_text(f"Unload {model} version 1: done.")).to_be_visible()
    assert httpx.get(f"{base}/v2/models/{model}/ready").status_code != 200
    state = next(
        e for e in httpx.post(f"{base}/v2/repository/index", json={}).json() if e["name"] == model
    )
    expect(row.locator(".badge")).to_have_text(state["state"])
    row.get_by_role("button", name="Load").click()
    expect(page.get_by_text(f"Load {model}: done.")).to_be_visible()
    expect(row.locator(".badge")).to_have_text("READY")
    assert httpx.get(f"{base}/v2/models/{model}/ready").status_code == 200


def test_model_page_shows_the_package_report(
    page: Page, console: ConsoleServer, screenshot: Callable[..., Path]
) -> None:
    written = manifest(console, "digits_resnet")
    open_page(page, console, "#/model/digits_resnet")
    rows = page.locator("table.batchnorm tbody tr")
    expect(rows).to_have_count(written["batchnorm"]["total"])
    for entry in written["batchnorm"]["folded"]:
        row = rows.filter(
            has=page.locator("td code", has_text=re.compile(f"^{re.escape(entry['name'])}$"))
        )
        expect(row).to_contain_text(f"folded into {entry['into']} ({entry['direction']})")
    for graph in ("eval", "train", "calibration"):
        expect(page.get_by_role("row", name=re.compile(f"^{graph} "))).to_contain_text("passed")
    expect(page.locator("dl.facts")).to_contain_text(written["source"]["sha256"])
    expect(page.get_by_text("Never recalibrated")).to_be_visible()
    screenshot(page, "model")

    kept = manifest(console, KEPT_MODEL)["batchnorm"]["kept"]
    assert kept, "the kept-BN package keeps a BN"
    open_page(page, console, f"#/model/{KEPT_MODEL}")
    for entry in kept:
        expect(page.locator("table.batchnorm")).to_contain_text(f"kept: {entry['reason']}")

    open_page(page, console, f"#/model/{quote(HOSTILE_MODEL, safe='')}")
    expect(page.locator("h1 .model-name")).to_have_text(HOSTILE_MODEL)
    assert page.locator("main img").count() == 0


def test_compare_an_uploaded_npy_and_npz(
    page: Page, console: ConsoleServer, tmp_path: Path, screenshot: Callable[..., Path]
) -> None:
    pixels, _ = demo_pixels(contrast=0.3)
    batch = pixels[:48]
    np.save(tmp_path / "batch.npy", batch)
    expected = httpx.post(
        f"{console.base_url}/v2/models/digits_mlp/compare",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ]
        },
    ).json()
    open_page(page, console, "#/compare/digits_mlp")
    page.get_by_label("Upload .npy / .npz").check()
    page.set_input_files("#compare-file", str(tmp_path / "batch.npy"))
    page.click("#compare-upload")
    expect(page.locator("#compare-summary")).to_contain_text("Batch of 48 on digits_mlp version 1")
    agreement = f"{100 * expected['outputs'][0]['argmax_agreement']:.1f} %"
    expect(page.locator("#compare-result table tbody tr").first).to_contain_text(agreement)
    bars = page.locator("#compare-result svg.bars g.bar")
    expect(bars).to_have_count(len(expected["batchnorm"]))
    # worst first: the API's order by KL, and the chart's
    assert bars.first.get_attribute("data-layer") == expected["batchnorm"][0]["name"]
    expect(page.locator(".drilldown svg.columns rect.column")).to_have_count(
        expected["batchnorm"][0]["channels"]
    )
    screenshot(page, "compare", full_page=True)

    # an .npz for a model whose input is (N, 1, 8, 8), by its input's name
    np.savez(tmp_path / "batch.npz", input=batch.reshape(-1, 1, 8, 8))
    open_page(page, console, "#/compare/digits_resnet")
    page.get_by_label("Upload .npy / .npz").check()
    page.set_input_files("#compare-file", str(tmp_path / "batch.npz"))
    page.click("#compare-upload")
    expect(page.locator("#compare-summary")).to_contain_text("Batch of 48 on digits_resnet")


def test_compare_a_pasted_v2_body_and_show_its_error(
    page: Page, console: ConsoleServer, page_errors: PageErrors
) -> None:
    pixels, _ = demo_pixels(brightness=0.4)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [8, 64],
                "datatype": "FP32",
                "data": pixels[:8].ravel().tolist(),
            }
        ]
    }
    expected = httpx.post(f"{console.base_url}/v2/models/digits_mlp/compare", json=body).json()
    open_page(page, console, "#/compare/digits_mlp")
    page.get_by_label("Paste V2 JSON").check()
    page.fill("#compare-json", json.dumps(body))
    page.click("#compare-paste")
    expect(page.locator("#compare-summary")).to_contain_text("Batch of 8 on digits_mlp")
    assert (
        page.locator("#compare-result svg.bars g.bar").first.get_attribute("data-layer")
        == (expected["batchnorm"][0]["name"])
    )
    # a body that does not fit: the server's message, shown as text
    page_errors.allow("status of 422")
    body["inputs"][0]["shape"] = [8, 63]
    body["inputs"][0]["data"] = body["inputs"][0]["data"][: 8 * 63]
    page.fill("#compare-json", json.dumps(body))
    page.click("#compare-paste")
    error = httpx.post(f"{console.base_url}/v2/models/digits_mlp/compare", json=body).json()[
        "error"
    ]
    expect(page.get_by_role("alert")).to_contain_text(error)


def test_compare_demo_slider_raises_the_drift_and_lowers_eval_accuracy(
    page: Page, console: ConsoleServer
) -> None:
    open_page(page, console, "#/compare/digits_mlp")
    expect(page.locator("#compare-summary")).to_contain_text("Batch of 128")
    clean_kl = first_bar_value(page)
    clean_accuracy = page.locator("#eval-accuracy .big").inner_text()
    # the accuracy the card shows is the eval graph's on the shipped labels
    pixels, labels = demo_pixels()
    outputs = httpx.post(
        f"{console.base_url}/v2/models/digits_mlp/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "data": pixels.ravel().tolist(),
                }
            ]
        },
    ).json()["outputs"][0]
    predicted = np.asarray(outputs["data"]).reshape(outputs["shape"]).argmax(axis=1)
    assert clean_accuracy == f"{100 * (predicted == labels).mean():.1f} %"

    page.fill("#compare-contrast", "0.3")
    expect(page.locator("#compare-contrast-value")).to_have_text("0.30")
    page.wait_for_function(
        "(old) => { const v = document.querySelector('#compare-result svg.bars g.bar .value');"
        " return v && Number(v.textContent) > 5 * old; }",
        arg=clean_kl,
    )
    shifted_eval = float(page.locator("#eval-accuracy .big").inner_text().rstrip(" %"))
    shifted_train = float(page.locator("#train-accuracy .big").inner_text().rstrip(" %"))
    assert shifted_eval < float(clean_accuracy.rstrip(" %"))
    assert shifted_eval < shifted_train


def test_drift_rises_with_shifted_traffic_and_recalibration_rolls_forward_and_back(
    page: Page, console: ConsoleServer, screenshot: Callable[..., Path]
) -> None:
    base = console.base_url
    open_page(page, console, f"#/drift/{DRIFT_MODEL}")
    expect(page.locator("#drift-verdict .big")).to_have_text("insufficient data")
    expect(page.locator("#recalibrate")).to_be_disabled()

    page.fill("#drift-contrast", "0.3")
    page.select_option("#drift-count", "16")
    page.click("#drift-send")
    expect(page.locator("#drift-verdict .big")).to_have_text("drifted", timeout=15_000)
    report = httpx.get(f"{base}/v2/models/{DRIFT_MODEL}/drift").json()
    assert report["verdict"]["status"] == "drifted"
    expect(page.locator("#drift-verdict")).to_contain_text(
        f"{report['verdict']['drifted_layers']} of {report['verdict']['layers']} layers drifted"
    )
    screenshot(page, "drift", full_page=True)

    # the token: entered, used, never stored
    page.fill("#admin-token", console.token)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#recalibrate")).to_be_enabled()
    stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]

    page.fill("#drift-contrast", "0.3")
    page.click("#recalibrate")
    expect(page.locator("#new-version")).to_have_text("Version 2 is READY", timeout=60_000)
    index = httpx.post(f"{base}/v2/repository/index", json={}).json()
    assert {"name": DRIFT_MODEL, "version": "2", "state": "READY"}.items() <= next(
        entry for entry in index if entry["name"] == DRIFT_MODEL and entry["version"] == "2"
    ).items()
    assert httpx.get(f"{base}/v2/models/{DRIFT_MODEL}").json()["parameters"]["version"] == "2"
    # the before → after chart: one row per layer, as the package lists them
    rows = page.locator("#recalibration-result svg.bars g.bar")
    expect(rows).to_have_count(len(manifest(console, DRIFT_MODEL, 2)["batchnorm"]["layers"]))
    screenshot(page, "recalibrate", full_page=True)

    # the new version's report (in a second tab) lists where its statistics came from
    report = page.context.new_page()
    open_page(report, console, f"#/model/{DRIFT_MODEL}/2")
    history = manifest(console, DRIFT_MODEL, 2)["recalibrations"]
    rows = report.locator("section", has=report.locator("#recalibration-title")).locator("tbody tr")
    expect(rows).to_have_count(len(history))
    cells = rows.first.locator("td")
    expect(cells.nth(0)).to_have_text(str(history[0]["from_version"]))
    expect(cells.nth(1)).to_have_text(history[0]["method"])
    expect(cells.nth(2)).to_have_text(str(history[0]["samples"]))
    report.close()

    page.click("#rollback")
    expect(page.get_by_text("Version 2 unloaded")).to_be_visible()
    assert httpx.get(f"{base}/v2/models/{DRIFT_MODEL}").json()["parameters"]["version"] == "1"


def test_keyboard_labels_and_a_narrow_screen(
    page: Page, console: ConsoleServer, screenshot: Callable[..., Path]
) -> None:
    open_page(page, console, "#/compare/digits_resnet")
    expect(page.locator("#compare-summary")).to_contain_text("Batch of 128")
    # the first Tab reaches the skip link
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip"
    # a layer bar is reachable by keyboard and Enter opens its channels
    second = page.locator("#compare-result svg.bars g.bar").nth(1)
    layer = second.get_attribute("data-layer")
    second.focus()
    page.keyboard.press("Enter")
    expect(page.locator(".drilldown h3")).to_have_text(f"Channels of {layer}")
    # every form control has a label
    unlabeled = page.evaluate(
        "() => [...document.querySelectorAll('input, select, textarea')]"
        ".filter((e) => e.labels.length === 0 && !e.getAttribute('aria-label')).map((e) => e.id)"
    )
    assert unlabeled == []

    page.set_viewport_size({"width": 390, "height": 844})
    for fragment in ("#/", "#/model/digits_mlp", "#/compare/digits_mlp", f"#/drift/{DRIFT_MODEL}"):
        open_page(page, console, fragment)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{fragment} is {overflow} px wider than a 390 px screen"
    open_page(page, console, "#/compare/digits_mlp")
    expect(page.locator("#compare-summary")).to_contain_text("Batch of 128")
    screenshot(page, "narrow")


def test_empty_repository_says_what_to_do_and_unavailable_versions_say_why(
    page: Page,
    page_errors: PageErrors,
    tmp_path: Path,
    digits_repository: Path,
    screenshot: Callable[..., Path],
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with running_server(Settings(repository=empty, device="cpu")) as server:
        page.goto(f"{server.url}/ui/")
        expect(page.get_by_role("heading", name="No models are being served yet")).to_be_visible()
        expect(page.locator(".empty pre")).to_contain_text(
            "bnfold convert digits_mlp --repository ./repo"
        )
        screenshot(page, "empty")
        page.goto(f"{server.url}/ui/#/drift")
        expect(page.get_by_role("heading", name="No models are being served yet")).to_be_visible()

    broken = copy_repository(digits_repository, tmp_path / "broken")
    model = broken / "digits_mlp" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"tampered")
    with running_server(Settings(repository=broken, device="cpu")) as server:
        entry = next(
            e
            for e in httpx.post(f"{server.url}/v2/repository/index", json={}).json()
            if e["name"] == "digits_mlp"
        )
        assert entry["state"] == "UNAVAILABLE"
        page.goto(f"{server.url}/ui/")
        row = page.locator('tr[data-model="digits_mlp"]')
        expect(row.locator(".badge")).to_have_text("UNAVAILABLE")
        expect(row.locator(".reason")).to_have_text(entry["reason"])
