"""The studio in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): load, generate, screenshot.

Skipped when chromium or playwright is missing. The screenshot goes to artifacts/browser-compare.png.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_app import REPO, launch_app, make_fake_weights, stop_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    root = tmp_path_factory.mktemp("browser")
    proc, url = launch_app(make_fake_weights(root / "weights"), root / "app.log")
    yield url
    stop_app(proc)


def test_compare_in_browser(app_url):
    from playwright.sync_api import sync_playwright

    out = REPO / "artifacts" / "browser-compare.png"
    out.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1300})
            page.goto(app_url, wait_until="domcontentloaded")
            page.locator("#generate").wait_for(timeout=60_000)
            assert page.get_by_text("SPLAM Studio").first.is_visible()
            page.locator("#generate").click()
            for role in ("teacher", "lcm", "splam"):
                page.locator(f"#panel-{role} img").first.wait_for(state="visible", timeout=120_000)
            page.get_by_text("faster").first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out), full_page=True)
            for role, model in (("teacher", "shapes-teacher"), ("lcm", "shapes-lcm"), ("splam", "shapes-splam")):
                caption = page.locator(f"#caption-{role}").first.inner_text()
                assert model in caption and "seed 0" in caption
        finally:
            browser.close()
    assert out.stat().st_size > 10_000
