"""The Slides pages in a real headless browser (Debian's chromium and chromedriver through selenium,
tests/edge/browser.py; without them these tests skip), against server.py on 127.0.0.1 with the
tiny model: upload a slide from the page, watch it being analysed, open the viewer (OpenSeadragon
fetching Deep Zoom tiles), switch the P(IDC) overlay, and follow a flagged tile to its review item
and back to its place on the slide. The page policy holds throughout: no violation is reported."""

import numpy as np
import pytest

from tests.edge.browser import Server, css, wait_for
from tests.slides import paste, write_slide
from tests.synthetic import patch_image

PATCH = 50
IDC_CELLS = [(c, r) for c in range(1, 4) for r in range(1, 3)]
BENIGN_CELLS = [(c, r) for c in range(6, 9) for r in range(2, 4)]
# Every securitypolicyviolation, from before the page's own scripts run.
RECORD_VIOLATIONS = """window.violations = [];
document.addEventListener('securitypolicyviolation',
    e => window.violations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));"""


@pytest.fixture
def slide_server(tiny_project, tiny_classifier, make_config, tmp_path):
    """server.py on the tiny model, every tile flagged for review (a band of almost 0.5), slides in tmp_path."""
    model_config, _ = tiny_project
    config = make_config(ClassifierSettings={"model_dir": str(model_config.model_dir), "image_size": 75},
                         Server={"review_db": str(tmp_path / "review.sqlite3")},
                         Slides={"output_dir": str(tmp_path / "slides"), "poll_seconds": 0.2})
    server = Server(config.path, tmp_path / "server.log").start()
    yield server
    server.stop()


@pytest.fixture
def recording(browser):
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS})
    return browser


def make_slide(path):
    rng = np.random.default_rng(3)
    image = paste([(np.asarray(patch_image(label, rng)), c * PATCH, r * PATCH)
                   for label, cells in ((1, IDC_CELLS), (0, BENIGN_CELLS)) for c, r in cells], (11 * PATCH, 5 * PATCH))
    return write_slide(path, image, 4.0, levels=2, tile=128)


def settled(driver) -> bool:
    """OpenSeadragon has drawn its view and is not animating towards another."""
    return driver.execute_script("""const v = window.slideViewer;
        if (!v || !v.world.getItemCount() || !v.world.getItemAt(0).getFullyLoaded()) return false;
        const a = v.viewport.getBounds(true), b = v.viewport.getBounds(false);
        return Math.abs(a.x - b.x) + Math.abs(a.y - b.y) + Math.abs(a.width - b.width) < 1e-9;""")


def shown_bounds(driver) -> list[float]:
    """The part of the slide in view, in level-0 pixels: x, y, width, height."""
    return driver.execute_script("""const v = window.slideViewer;
        const r = v.world.getItemAt(0).viewportToImageRectangle(v.viewport.getBounds(true));
        return [r.x, r.y, r.width, r.height];""")


def click_at(driver, x: float, y: float):
    """A real click on the viewer at the slide's level-0 pixel (x, y)."""
    from selenium.webdriver.common.action_chains import ActionChains

    view = css(driver, "#viewer")[0]
    px, py, width, height = driver.execute_script("""const v = window.slideViewer, el = arguments[2];
        const point = new OpenSeadragon.Point(arguments[0], arguments[1]);
        const p = v.world.getItemAt(0).imageToViewerElementCoordinates(point);
        return [p.x, p.y, el.clientWidth, el.clientHeight];""", x, y, view)
    ActionChains(driver).move_to_element_with_offset(view, int(px - width / 2), int(py - height / 2)).click().perform()


def violations(driver) -> list[str]:
    """The page policy's violations on this page (none: every script and style is the server's own)."""
    return driver.execute_script("return window.violations")


def test_upload_view_overlay_and_review_links(recording, slide_server, tmp_path):
    browser, url = recording, slide_server.url
    browser.get(url + "/slides")
    assert css(browser, "nav a[aria-current='page']")[0].text == "Slides"
    wait_for(browser, lambda d: css(d, "#slides[data-loaded='yes']"), "the slides list")
    assert css(browser, "#no-slides")[0].is_displayed()
    css(browser, "#slide-file")[0].send_keys(str(make_slide(tmp_path / "tumour.tiff")))
    row = wait_for(browser, lambda d: css(d, "#slides tr[data-id='tumour'][data-status='done']"), "the slide done")[0]
    cells = [td.text for td in row.find_elements("css selector", "td")]
    tiles = len(IDC_CELLS) + len(BENIGN_CELLS)
    assert cells[0] == "tumour.tiff" and cells[1] == "done" and cells[2] == str(tiles) and cells[6] == str(tiles), cells
    assert "queued as tumour" in browser.find_element("id", "status").text
    assert violations(browser) == []

    # The viewer: OpenSeadragon's canvas, Deep Zoom tiles fetched, the summary and the downloads.
    row.find_element("css selector", "a").click()
    wait_for(browser, lambda d: css(d, "#viewer[data-ready='yes']") and settled(d), "the viewer")
    assert browser.current_url == url + "/slides/tumour"
    assert css(browser, "#viewer .openseadragon-canvas canvas")
    fetched = browser.execute_script("""return performance.getEntriesByType('resource').map(e => e.name)
        .filter(n => n.includes('/slides/tumour_files/'));""")
    assert fetched and all(".jpeg?v=" in name for name in fetched), fetched  # versioned: the file's mtime
    figures = browser.find_element("id", "figures").text
    assert f"tiles classified\n{tiles} of 55" in figures and f"to review\n{tiles}" in figures, figures
    links = {a.text: a.get_attribute("href") for a in css(browser, "#downloads a")}
    assert links["tiles CSV"] == url + "/api/slides/tumour/files/tiles.csv" and len(links) == 5
    frames = css(browser, ".slide-layer rect.frame")
    assert len(frames) == tiles

    # The overlay over the grid, unsmoothed; the checkbox hides and shows it, the slider fades it.
    overlay = css(browser, ".slide-layer image.p-overlay")[0]
    assert browser.execute_script("return getComputedStyle(arguments[0]).imageRendering", overlay) == "pixelated"
    assert overlay.get_attribute("width") == "550" and overlay.get_attribute("height") == "250"
    assert css(browser, "#viewer[data-overlay='shown']")
    css(browser, "#show-overlay")[0].click()
    assert css(browser, "#viewer[data-overlay='hidden']")
    assert browser.execute_script("return getComputedStyle(arguments[0]).visibility", overlay) == "hidden"
    css(browser, "#show-overlay")[0].click()
    assert browser.execute_script("return getComputedStyle(arguments[0]).visibility", overlay) == "visible"
    browser.execute_script("""const s = document.getElementById('overlay-opacity');
        s.value = 80; s.dispatchEvent(new Event('input'));""")
    assert overlay.get_attribute("opacity") == "0.8" and css(browser, "#viewer[data-opacity='0.8']")

    assert violations(browser) == []

    # A click beside the tissue says so; a click on a framed tile opens its review item, alone.
    click_at(browser, 10 * PATCH + 25, 25)
    wait_for(browser, lambda d: d.find_element("id", "status").text == "no tissue here: not classified", "glass")
    x, y = IDC_CELLS[0][0] * PATCH, IDC_CELLS[0][1] * PATCH
    click_at(browser, x + 25, y + 25)
    wait_for(browser, lambda d: "/review?item=" in d.current_url, "the review item")
    item = browser.current_url.split("item=")[1]
    wait_for(browser, lambda d: css(d, "#queue[data-loaded='yes'] .card"), "the review item")
    [card] = css(browser, ".card")
    assert card.get_attribute("id") == f"item-{item}"
    assert f"slide tumour (x {x}, y {y})" in card.find_element("css selector", ".name").text
    assert "Item %s only (a tile of slide tumour)" % item in browser.find_element("id", "only-item").text
    assert violations(browser) == []

    # Its "on the slide" link: the viewer, zoomed to that tile, framed.
    card.find_element("css selector", "a.on-slide").click()
    wait_for(browser, lambda d: css(d, f"#viewer[data-ready='yes'][data-picked='{x},{y}']") and settled(d),
             "the viewer at the tile")
    assert browser.current_url == f"{url}/slides/tumour?x={x}&y={y}&size={PATCH}"
    left, top, width, height = shown_bounds(browser)
    assert left <= x and top <= y and x + PATCH <= left + width and y + PATCH <= top + height
    assert min(width, height) <= 5 * PATCH + 1  # zoomed in on it, not the whole slide
    picked = css(browser, ".slide-layer rect.picked")[0]
    assert (picked.get_attribute("x"), picked.get_attribute("y")) == (str(x), str(y))
    # The whole queue again from the one-item view.
    browser.back()
    wait_for(browser, lambda d: css(d, "#only-item a"), "the one-item view")
    css(browser, "#only-item a")[0].click()
    wait_for(browser, lambda d: len(css(d, "#queue[data-loaded='yes'] .card")) == tiles, "the whole queue")
    assert violations(browser) == []
