"""The studio in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) at a laptop's 1366x900 and a
phone's 390x844: layout, bad input, the heat map, the history, the Error bound tab and a Train run with a reload.

Skipped when chromium or playwright is missing. Screenshots go to artifacts/browser-*.png (git-ignored); each is
checked to be the viewport's size and not one flat colour.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_app import REPO

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
VIEWPORTS = {"laptop": {"width": 1366, "height": 900}, "phone": {"width": 390, "height": 844}}
ARTIFACTS = REPO / "artifacts"
WAIT = 180_000  # ms: generation on a busy 2-core machine

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(request):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    return request.getfixturevalue("plain_app")  # tests/conftest.py: the session's plain app


@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _open(browser, url, width):
    page = browser.new_page(viewport=VIEWPORTS[width])
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#generate").wait_for(timeout=60_000)
    return page


def _generate(page, button="#generate"):
    """Click Generate (or another button that runs a comparison) and wait until the SPLAM panel shows a new image and
    every caption is filled."""
    src = "document.querySelector('#panel-splam img') ? document.querySelector('#panel-splam img').src : ''"
    before = page.evaluate(src)
    page.locator(button).first.click()
    page.wait_for_function(f"b => ({src}) !== b", arg=before, timeout=WAIT)
    page.locator("#caption-splam").get_by_text("faster").wait_for(timeout=30_000)
    page.wait_for_timeout(500)


def _box(page, selector):
    return page.locator(selector).first.bounding_box()


def _screenshot(page, name: str, *, full_page: bool = False, selector: str | None = None):
    """Save artifacts/<name>.png and check it shows a page: the viewport's (or element's) size, and more than a few
    colours (a blank or crashed page is one colour)."""
    import io

    from PIL import Image

    target = page.locator(selector).first if selector else page
    data = target.screenshot(path=str(ARTIFACTS / f"{name}.png"), **({} if selector else {"full_page": full_page}))
    image = Image.open(io.BytesIO(data)).convert("RGB")
    vp = page.viewport_size
    if selector:
        box = _box(page, selector)
        assert abs(image.width - box["width"]) <= 1 and abs(image.height - box["height"]) <= 1, (name, image.size, box)
    elif full_page:
        assert image.width == vp["width"] and image.height >= vp["height"], (name, image.size, vp)
    else:
        assert image.size == (vp["width"], vp["height"]), (name, image.size, vp)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, f"{name}: {len(colours)} colours, a blank page"
    return image


def _in_view(page, selector) -> bool:
    """Whether the element lies whole within the first screen (the viewport at scroll 0)."""
    b, vp = _box(page, selector), page.viewport_size
    return b is not None and b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["width"] <= vp["width"] \
        and b["y"] + b["height"] <= vp["height"]


@pytest.mark.parametrize("width", ["laptop", "phone"])
def test_compare_layout(browser, app_url, width):
    page = _open(browser, app_url, width)
    try:
        page.wait_for_timeout(500)
        _screenshot(page, f"browser-first-screen-{width}")
        assert _in_view(page, "#prompt") and _in_view(page, "#generate")  # the first screen: type and go
        assert page.locator("#vocabulary").get_by_text("cross(es)").is_visible()  # the grammar's words, by the prompt
        if width == "phone":  # an example below the results fills the prompt, runs, and brings the results into view
            example = "#examples button >> nth=3"
            text = page.locator(example).inner_text().strip()
            _generate(page, example)
            assert page.locator("#prompt textarea").input_value() == text
            assert abs(_box(page, "#compare-row")["y"]) < 60, _box(page, "#compare-row")  # scrolled to it
        else:
            _generate(page)
        page.locator("#history").scroll_into_view_if_needed()
        page.wait_for_function("() => { const i = document.querySelector('#history img'); "
                               "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        _screenshot(page, f"browser-history-{width}", selector="#history")
        gallery, strip = _box(page, "#history"), _box(page, "#history img")
        assert strip["y"] + strip["height"] <= gallery["y"] + gallery["height"], (gallery, strip)  # in view, whole
        assert strip["width"] > 2.5 * strip["height"] and strip["width"] <= gallery["width"]
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        _screenshot(page, f"browser-compare-{width}")
        _screenshot(page, f"browser-compare-{width}-full", full_page=True)
        vp = VIEWPORTS[width]
        min_w = 250 if width == "laptop" else 0.75 * vp["width"]
        try:  # on a loaded machine the images' layout can lag their arrival; the asserts below still decide
            page.wait_for_function("w => ['teacher', 'lcm', 'splam'].every(r => { const i = document.querySelector("
                                   "`#panel-${r} img`); return i && i.getBoundingClientRect().width >= w; })",
                                   arg=min_w, timeout=60_000)
        except Exception as e:  # playwright's TimeoutError; the asserts below report what the layout is
            if type(e).__name__ != "TimeoutError":
                raise
        button = _box(page, "#generate")
        boxes = {r: _box(page, f"#panel-{r} img") for r in ("teacher", "lcm", "splam")}
        if width == "laptop":  # prompt and the three whole results in one view, side by side, large
            assert _box(page, "#prompt")["y"] >= 0
            for r, b in boxes.items():
                assert b["y"] + b["height"] <= vp["height"], (r, b)
                assert b["width"] >= 250, (r, b)
            assert boxes["teacher"]["x"] < boxes["lcm"]["x"] < boxes["splam"]["x"]
        else:  # top to bottom: the first result under the button (past the vocabulary line and Settings) and on
            # the first screen, each result full width
            assert 0 < boxes["teacher"]["y"] - (button["y"] + button["height"]) < 260, (button, boxes)
            assert boxes["teacher"]["y"] < vp["height"] - 100, boxes["teacher"]
            assert boxes["teacher"]["y"] < boxes["lcm"]["y"] < boxes["splam"]["y"]
            for b in boxes.values():
                assert b["width"] >= 0.75 * vp["width"] and b["x"] + b["width"] <= vp["width"]
        for role, model in (("teacher", "shapes-teacher"), ("lcm", "shapes-lcm"), ("splam", "shapes-splam")):
            caption = page.locator(f"#caption-{role}").inner_text()
            assert model in caption and "seed 0" in caption and "3 runs" in caption
            if role != "teacher":
                assert "PSNR" in caption and "faster" in caption
        examples = [b.inner_text().strip() for b in page.locator("#examples button").all()]
        assert len(examples) == 6 and all("..." not in e and e.endswith("background") for e in examples), examples
    finally:
        page.close()


def test_bad_input_keeps_results_and_names_the_field(browser, app_url):
    page = _open(browser, app_url, "laptop")
    try:
        _generate(page)
        src = page.locator("#panel-splam img").first.get_attribute("src")
        page.locator("#prompt textarea").fill("   ")
        page.locator("#generate").click()
        page.locator("#compare-notice").get_by_text("enter a prompt").wait_for(timeout=60_000)
        assert page.locator("#panel-splam img").first.get_attribute("src") == src  # the previous result stays
        assert page.locator("#panel-splam .error").count() == 0
        _screenshot(page, "browser-bad-input")
        page.locator("#prompt textarea").fill("one small green star at the right on a black background")
        page.locator("#controls").get_by_text("Settings").first.click()
        seed = page.locator("#seed input")
        seed.wait_for(state="visible")
        page.wait_for_timeout(500)  # the accordion has opened and the field holds its server value
        seed.click()
        seed.press("Control+A")
        seed.press_sequentially("-5")  # typed as a person types, so the page's state follows each key
        seed.press("Tab")  # commit the value before Generate reads it
        assert seed.input_value() == "-5"
        _generate(page)
        page.locator("#compare-notice").get_by_text("seed -5 is outside").wait_for(timeout=30_000)
        assert page.locator("#panel-splam img").first.get_attribute("src") != src
        assert page.locator("#history img").count() == 2
        captions = page.locator("#history").inner_text()
        assert "seed 0" in captions and "green star" in captions and "red circle" in captions  # told apart
        latest = page.locator("#panel-splam img").first.get_attribute("src")
        page.locator("#history .thumbnail-item").nth(1).click()  # the older one: the first prompt, seed 0
        page.wait_for_function("b => document.querySelector('#panel-splam img').src !== b", arg=latest, timeout=30_000)
        assert "red circle" in page.locator("#prompt textarea").input_value()
        assert page.locator("#panel-splam img").first.get_attribute("src") == src  # that result, as it was shown
        page.locator("#history .thumbnail-item").nth(0).click()
        page.wait_for_function("b => document.querySelector('#panel-splam img').src === b", arg=latest,
                               timeout=30_000)
        assert "green star" in page.locator("#prompt textarea").input_value()
        before = page.locator("#panel-splam img").first.get_attribute("src")
        page.locator("#show-diff input").check()
        page.wait_for_function("b => document.querySelector('#panel-splam img').src !== b", arg=before,
                               timeout=30_000)
        page.wait_for_timeout(300)
        _screenshot(page, "browser-heatmap")
    finally:
        page.close()


@pytest.mark.parametrize("width", ["laptop", "phone"])
def test_error_bound_tab(browser, app_url, width):
    page = _open(browser, app_url, width)
    try:
        page.get_by_role("tab", name="Error bound").click()
        page.locator("#eb-go").click()
        page.locator("#eb-summary").get_by_text("For this prompt and seed").wait_for(timeout=WAIT)
        page.locator("#eb-grid img").first.wait_for(timeout=30_000)
        page.wait_for_timeout(800)
        _screenshot(page, f"browser-error-bound-{width}", full_page=True)
        vp_w = VIEWPORTS[width]["width"]
        grid = _box(page, "#eb-grid img")
        assert grid["x"] >= 0 and grid["x"] + grid["width"] <= vp_w  # every column in view
        assert page.evaluate("document.documentElement.scrollWidth") <= vp_w  # nothing runs off to the side
        for part in ("#eb-summary table", "#eb-legend"):  # the table and the legend fit the width, whole
            box = _box(page, part)
            assert box["x"] >= 0 and box["x"] + box["width"] <= vp_w, (part, box)
        for part in ("#eb-summary table", "#eb-legend [data-testid=markdown]"):  # nothing cut off inside them
            assert page.evaluate("s => { const e = document.querySelector(s); return e.scrollWidth <= e.clientWidth + 1; }",
                                 part), part
        lines = page.evaluate("[...document.querySelectorAll('#eb-summary td:first-child, #eb-summary th:first-child')]"
                              ".map(c => { const r = document.createRange(); r.selectNodeContents(c); "
                              "return new Set([...r.getClientRects()].map(q => Math.round(q.top))).size; })")
        assert lines and all(n == 1 for n in lines), lines  # 'student', 'SPLAM' on one line each, not 'stude / nt'
        legend = page.locator("#eb-legend").inner_text()
        assert all(s in legend for s in ("LCM bound", "LCM real error", "SPLAM bound", "SPLAM real error"))
        plots = _box(page, "#eb-plot"), _box(page, "#eb-terms")
        if width == "phone":
            assert plots[1]["y"] >= plots[0]["y"] + plots[0]["height"] - 1  # stacked
    finally:
        page.close()


def test_train_tab_run_and_reload(browser, app_url):
    page = _open(browser, app_url, "laptop")
    try:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-start").wait_for()
        page.get_by_label("Steps").fill("6")
        page.get_by_label("Run name").fill("browser-run")
        page.locator("#train-start").click()
        page.wait_for_function("() => document.querySelector('#train-start').disabled", timeout=30_000)
        page.locator("#train-status").get_by_text("finished").wait_for(timeout=WAIT)
        assert not page.locator("#train-start").is_disabled()
        page.wait_for_timeout(2500)  # one more poll after the end
        _screenshot(page, "browser-train", full_page=True)
        page.get_by_text("Models", exact=True).first.click()
        page.get_by_label("SPLAM student").click()  # the finished run is in its role's menu, without Refresh
        page.get_by_role("option", name="browser-run · SPLAM").wait_for(timeout=10_000)
        page.reload(wait_until="domcontentloaded")
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-status").get_by_text("browser-run").wait_for(timeout=30_000)
        assert "finished" in page.locator("#train-status").inner_text()
        log = page.get_by_label("Log (tail)").input_value()
        assert "\x1b" not in log and "done:" in log
    finally:
        page.close()
