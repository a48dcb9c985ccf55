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
def page(server):
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            pg = browser.new_page()
            pg.set_default_timeout(30_000)
            pg.goto(server.url + "/")
            yield pg
        finally:
            browser.close()


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
