"""The quality gate's web page, end to end in headless Chromium (Debian's ``chromium`` driven by Playwright).

Nothing is downloaded: Playwright's Python client launches the system browser (``executable_path``). The
test skips when either is missing; `apt-get install chromium` and the ``test`` extra provide them.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from serve_helpers import DEMO_PNG

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed "
                                     "(pip install -e '.[test]')")

CHROMIUM = os.environ.get("MEDQM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium, or set "
                                "MEDQM_CHROMIUM to a Chromium binary); Playwright's own browsers are never downloaded")


@pytest.fixture(scope="module")
def browser():
    """One Playwright driver and browser for the module (the sync API cannot run two drivers at once)."""
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _open(browser, url: str):
    pg = browser.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(url + "/")
    return pg


@pytest.fixture(scope="module")
def page(server, browser):
    pg = _open(browser, server.url)
    yield pg
    pg.close()


def test_page_shows_the_model_card(page):
    playwright_api.expect(page.locator("#model")).to_contain_text("model medqm-i-serve-test@")
    playwright_api.expect(page.locator("#model")).to_contain_text("pass ≥ 0.5")


def test_choose_a_png_and_see_score_verdict_and_heatmap(page):
    page.set_input_files("#file", str(DEMO_PNG))
    card = page.locator(".result").first
    playwright_api.expect(card).to_contain_text(DEMO_PNG.name)
    assert card.locator(".verdict").inner_text().lower() in ("pass", "review", "reject")
    assert 0.0 <= float(card.locator(".quality").inner_text()) <= 1.0
    playwright_api.expect(card).to_contain_text("likely")
    heat = card.locator("img.heatmap")
    heat.wait_for()
    assert heat.evaluate("img => img.complete && img.naturalWidth") == 256
    assert page.locator("#error").inner_text() == ""


def test_drop_a_dicom(page):
    data = base64.b64encode(Path(get_testdata_file("CT_small.dcm")).read_bytes()).decode()
    transfer = page.evaluate_handle(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.dcm", { type: "application/dicom" }));
            return dt;
        }""", data)
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    card = page.locator(".result").first
    playwright_api.expect(card).to_contain_text("dropped.dcm")
    playwright_api.expect(card).to_contain_text("CT")
    playwright_api.expect(card).to_contain_text("128 × 128")


def test_an_unsupported_file_shows_the_reason(page, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    playwright_api.expect(page.locator("#error")).to_contain_text("415")
    playwright_api.expect(page.locator("#error")).to_contain_text("notes.txt: unrecognised file format")


@pytest.fixture(scope="module")
def gated_page(checkpoint, browser, tmp_path_factory):
    """The page of a service with a calibrated gate: CT has its own threshold (0, so it passes)."""
    from serve_helpers import LiveServer, gate_threshold, make_config, write_gate

    from medqm.serve import create_app

    path = write_gate(tmp_path_factory.mktemp("gate") / "gate.json", gate_threshold(None),
                      by_modality={"CT": gate_threshold(0.0)})
    with LiveServer(create_app(make_config(checkpoint, gate=path))) as server:
        pg = _open(browser, server.url)
        yield pg
        pg.close()


def test_the_guarantee_is_shown_next_to_the_verdict(gated_page):
    page = gated_page
    playwright_api.expect(page.locator("#model")).to_contain_text("calibrated gate: nothing passes (CT: pass ≥ 0)")
    playwright_api.expect(page.locator("#gate")).to_contain_text("lost-answer-rate ≤ α = 0.1")
    page.fill("#modality", "CT")
    page.set_input_files("#file", str(DEMO_PNG))
    card = page.locator(".result").first
    playwright_api.expect(card.locator(".guarantee")).to_contain_text("CT threshold, pass ≥ 0: with probability")
    assert card.locator(".verdict").inner_text().lower() == "pass"
    page.fill("#modality", "MR")
    page.set_input_files("#file", str(DEMO_PNG))
    card = page.locator(".result").first  # the newest card comes first
    playwright_api.expect(card.locator(".guarantee")).to_contain_text("overall threshold, nothing passes: no threshold")
    assert card.locator(".verdict").inner_text().lower() in ("review", "reject")
