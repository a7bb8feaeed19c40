"""The review station in a real headless browser: Debian's chromium driven by selenium through
Debian's chromedriver (apt-get install chromium chromium-driver; .ci/run installs them), against
server.py on 127.0.0.1. Nothing downloads a browser; without chromium/chromedriver these tests skip.
The two screenshots of the README are taken here: into docs/screenshots/ with
IDC_SCREENSHOTS=1 (to refresh them), else into a temporary folder, so a test run leaves the
checkout unchanged."""

import csv
import io
import os
import tempfile
import zipfile
from pathlib import Path

import pytest
import requests

from tests.edge.browser import Server, css, wait_for
from tests.paths import ROOT
from tests.synthetic import make_dataset

SCREENSHOTS = ROOT / "docs" / "screenshots" if os.environ.get("IDC_SCREENSHOTS") else None


@pytest.fixture
def serve(tiny_project, tiny_classifier, make_config, tmp_path):
    """serve(rule=(threshold, band), **Server keys) -> a running server.py on the tiny model, its review db
    in tmp_path; by default a review band so wide that every patch is flagged."""
    model_config, _ = tiny_project
    servers = []

    def start(rule=("0.5", "0.499999"), **server):
        config = make_config(name=f"confs-{len(servers)}.json",
                             ClassifierSettings={"model_dir": str(model_config.model_dir), "image_size": 75},
                             Server={"review_db": str(tmp_path / "review.sqlite3"), **server})
        servers.append(Server(config.path, tmp_path / "server.log", rule).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def drop_files(driver, paths):
    """A real drop event on the drop zone, carrying real files (selenium cannot drag from the desktop:
    the files go through a file input into a DataTransfer, then `drop` is dispatched)."""
    driver.execute_script("""
        const input = document.createElement('input');
        input.type = 'file'; input.multiple = true; input.id = 'drop-source'; input.style.display = 'none';
        document.body.appendChild(input);""")
    css(driver, "#drop-source")[0].send_keys("\n".join(str(p) for p in paths))
    driver.execute_script("""
        const input = document.getElementById('drop-source'), transfer = new DataTransfer();
        for (const file of input.files) transfer.items.add(file);
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
        input.remove();""")


CLASS_TEXT = ("class0", "class1", "/0/", "/1/")  # a Kaggle name's true label: never on a page


def shown_text(driver) -> str:
    """What a reviewer can read: the page's text, and the titles, alt texts and labels of its elements."""
    return driver.execute_script("""
        const seen = [...document.querySelectorAll('[title], [alt], [aria-label]')].map(
            el => [el.title, el.alt, el.getAttribute('aria-label')].join(' '));
        return document.body.innerText + '\\n' + seen.join('\\n');""")


def assert_no_class_shown(driver):
    text = shown_text(driver)
    assert not [t for t in CLASS_TEXT if t in text], text


def wrapped(driver, selector) -> list[str]:
    """The elements matching `selector` whose text takes more than one line (their text's height against
    their line height), or an inline element broken across lines."""
    return driver.execute_script("""
        return [...document.querySelectorAll(arguments[0])].filter(el => {
            const range = document.createRange();
            range.selectNodeContents(el);
            const line = parseFloat(getComputedStyle(el).lineHeight);
            return range.getBoundingClientRect().height > 1.5 * line
                || (getComputedStyle(el).display === 'inline' && el.getClientRects().length > 1);
        }).map(el => el.textContent);""", selector)


def in_view(driver, element) -> bool:
    return driver.execute_script("""const r = arguments[0].getBoundingClientRect();
        return r.top >= 0 && r.bottom <= window.innerHeight;""", element)


def click_cell(driver, x: int, y: int):
    """A real click on the mosaic at the centre of the patch at slide coordinates (x, y) (the synthetic
    patient starts at 0, 0 and is drawn at scale 1)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = css(driver, ".mosaic canvas")[0]
    shown_w, shown_h, w, h = driver.execute_script("""const c = arguments[0], r = c.getBoundingClientRect();
        return [r.width, r.height, c.width, c.height];""", canvas)
    dx, dy = (x + 25) * shown_w / w - shown_w / 2, (y + 25) * shown_h / h - shown_h / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(dx), int(dy)).click().perform()


def save_screenshot(driver, name: str) -> Path:
    """A small PNG (palette) for the README."""
    from PIL import Image

    folder = SCREENSHOTS or Path(tempfile.gettempdir()) / "idc-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path = folder / name
    image.quantize(colors=128).save(path, optimize=True)
    return path


def test_classify_review_restart_export(browser, serve, tiny_project, tmp_path):
    config, _ = tiny_project
    server = serve()
    test = config.model_dir / "test"
    browser.get(server.url + "/")
    assert "IDC review station" in browser.title
    rule = "IDC when P(IDC) \u2265 0.5; needs review within \u00b10.499999 of it"
    assert rule in browser.find_element("id", "rule").text
    # Drop a positive and a negative patch (the file chooser): both verdicts appear.
    css(browser, "#files")[0].send_keys(f"{test / 'positive.png'}\n{test / 'negative.png'}")
    wait_for(browser, lambda d: len(css(d, "#results tbody tr")) == 2, "two verdicts")
    verdicts = {row.get_attribute("data-file"): row.get_attribute("data-verdict")
                for row in css(browser, "#results tbody tr")}
    assert verdicts == {"positive.png": "IDC", "negative.png": "no IDC"}
    # Drop a zip of one synthetic patient (Kaggle layout): the mosaic fills, cell by cell.
    root = make_dataset(tmp_path / "patient", patients=1, per_class=8, seed=5)
    archive = tmp_path / "9000.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for png in sorted(root.rglob("*.png")):
            z.write(png, png.relative_to(root))
    drop_files(browser, [archive])
    wait_for(browser, lambda d: css(d, ".mosaic[data-patient='9000'][data-cells='16']"), "the patient's mosaic")
    wait_for(browser, lambda d: d.find_element("id", "status").text.startswith("done"), "the batch to finish")
    rows = css(browser, "#results tbody tr")
    assert len(rows) == 18
    assert browser.execute_script("""const c = document.querySelector('.mosaic canvas');
        return [c.width, c.height, c.getContext('2d').getImageData(5, 5, 1, 1).data[3]];""")[2] > 0
    # P(IDC) as what it is; the class of a Kaggle name is never shown; names do not wrap.
    headers = [th.text for th in css(browser, "#results th")]
    assert "P(IDC)" in headers and "confidence" not in browser.find_element("tag name", "body").text.lower()
    names = [row.find_element("css selector", "td.file").text for row in rows]
    assert names[2:4] == ["9000_idx5_x0_y0", "9000_idx5_x100_y0"], names  # 9000/0/9000_idx5_x0_y0_class0.png
    assert_no_class_shown(browser)
    assert wrapped(browser, "#results td.file, #results td.p, #results th, .mosaic h2") == []
    # The mosaic beside the results, not above them: the first rows are in view.
    mosaic, table = css(browser, ".mosaic")[0].rect, css(browser, "#results")[0].rect
    assert mosaic["x"] + mosaic["width"] <= table["x"] and in_view(browser, rows[2])
    # A mosaic cell leads to its row (scrolled to, highlighted); a row's button back to its cell.
    last = css(browser, "#results tr[data-x='350'][data-y='50']")[0]
    assert not in_view(browser, last)
    click_cell(browser, 350, 50)
    wait_for(browser, lambda d: "selected" in last.get_attribute("class"), "the cell's row highlighted")
    assert in_view(browser, last) and browser.execute_script("return window.scrollY") > 0
    assert css(browser, ".mosaic")[0].get_attribute("data-selected") == last.get_attribute("id")
    assert in_view(browser, css(browser, ".mosaic canvas")[0])  # the mosaic stays in view
    browser.execute_script("window.scrollTo(0, 0)")
    row = css(browser, "#results tr[data-x='200'][data-y='0']")[0]
    assert in_view(browser, row)
    row.find_element("css selector", "button.locate").click()
    wait_for(browser, lambda d: css(d, ".mosaic")[0].get_attribute("data-selected") == row.get_attribute("id"),
             "the row's cell marked")
    assert [r.get_attribute("id") for r in css(browser, "#results tr.selected")] == [row.get_attribute("id")]
    assert browser.execute_script("return window.scrollY") == 0
    save_screenshot(browser, "classify.png")

    # The queue: every patch was flagged (a review band of almost 0.5); label the positive one "no IDC".
    browser.get(server.url + "/review")
    wait_for(browser, lambda d: css(d, "#queue[data-loaded='yes'] .card"), "the review queue")
    cards = css(browser, ".card")
    assert len(cards) == 18
    assert_no_class_shown(browser)
    card = next(c for c in cards if c.find_element("css selector", ".name").text == "positive.png")
    item_id = card.get_attribute("data-id")
    css(browser, "#reviewer")[0].send_keys("Dr Example")
    card.find_element("css selector", "textarea").send_keys("no tumour, stroma only")
    card.find_element("css selector", "button.label-no_idc").click()
    wait_for(browser, lambda d: css(d, f".card[data-id='{item_id}'][data-review-label='no_idc']"), "the label")
    reviewed = css(browser, f".card[data-id='{item_id}'] .reviewed")[0].text
    assert reviewed.startswith("Reviewed: no IDC, by Dr Example, at ") and "differs from the model" in reviewed
    model_line = css(browser, f".card[data-id='{item_id}'] .model")[0].text
    assert model_line.startswith("Model: IDC \u00b7 P(IDC) ") and float(model_line.split()[4]) >= 0.9, model_line

    # Restart the server: the review is still there, and in the CSV export.
    server.restart()
    browser.get(server.url + "/review")
    css(browser, "#filter option[value='reviewed']")[0].click()
    wait_for(browser, lambda d: css(d, f".card[data-id='{item_id}'][data-decision='disagree']"), "the review kept")
    export = requests.get(server.url + "/api/review/export.csv", timeout=10)
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [(r["id"], r["file"], r["decision"], r["reviewer"], r["note"], r["label"]) for r in rows] == [
        (item_id, "positive.png", "disagree", "Dr Example", "no tumour, stroma only", "0")]


SEEDED = [  # P(IDC), the model's label, flagged (threshold 0.495, band 0.11), name
    (0.5165, 1, True, "9036/1/9036_idx5_x1001_y801_class1.png"),
    (0.4822, 0, True, "9036/0/9036_idx5_x1051_y801_class0.png"),
    (0.5600, 1, True, "9036/1/9036_idx5_x1101_y801_class1.png"),
    (0.4410, 0, True, "9036/0/9036_idx5_x1151_y801_class0.png"),
    (0.9300, 1, False, "9036/1/9036_idx5_x1201_y851_class1.png"),  # queued as IDC (Server.review_all_idc)
    (0.5030, 1, True, "10253/1/10253_idx5_x51_y51_class1.png"),
    (0.3990, 0, True, "10253/0/10253_idx5_x101_y51_class0.png"),  # reviewed already
    (0.8800, 1, False, "10253/1/10253_idx5_x151_y101_class1.png"),
    (0.5890, 1, True, "scanner_export_2024-03-11_slide_0042_region_017_tile_00123_level_0_colour_corrected.png"),
]


def seed_queue(path):
    """The queue of SEEDED (images: synthetic patches of the model's class); the 0.3990 one reviewed."""
    import numpy as np

    from idc.edge.web.store import QueueEntry, ReviewStore
    from tests.synthetic import patch_image

    rng, entries = np.random.default_rng(7), []
    for p, label, flagged, name in SEEDED:
        out = io.BytesIO()
        patch_image(label, rng).save(out, "PNG")
        entries.append(QueueEntry(out.getvalue(), "PNG", p, label, flagged, name, "DevCloudIDC/FP16"))
    store = ReviewStore(path)
    ids = store.add(entries)
    store.review(ids[6], "no_idc", reviewer="Dr Lee")
    return dict(zip((p for p, *_ in SEEDED), ids))


def test_the_reviewer_sets_the_label_in_the_most_uncertain_first_queue(browser, serve, tmp_path):
    from selenium.webdriver.support.select import Select

    ids = seed_queue(tmp_path / "review.sqlite3")
    server = serve(rule=("0.495", "0.11"))
    browser.get(server.url + "/review")
    wait_for(browser, lambda d: css(d, "#queue[data-loaded='yes'] .card"), "the review queue")
    assert browser.find_element("id", "rule").text == (
        "Decision rule: IDC when P(IDC) \u2265 0.495; needs review within \u00b10.11 of it (0.385 < P(IDC) < 0.605)")

    def shown():
        return [float(c.get_attribute("data-p")) for c in css(browser, "#queue[data-loaded='yes'] .card")]

    def expect(ps, what):
        wait_for(browser, lambda d: shown() == ps, f"{what}: {ps}")

    def uncertain(rows):
        return sorted((p for p, *_ in rows), key=lambda p: abs(p - 0.495))

    pending = [row for row in SEEDED if row[0] != 0.3990]
    expect(uncertain(pending), "most uncertain first")
    first = css(browser, ".card")[0]
    assert first.find_element("css selector", ".model").text == (
        "Model: IDC \u00b7 P(IDC) 0.5030 needs review \u00b7 0.0080 above the threshold")
    assert first.find_element("css selector", ".name").text == "10253_idx5_x51_y51 \u00b7 patient 10253 (x 51, y 51)"
    assert "confidence" not in browser.find_element("tag name", "body").text.lower()
    assert_no_class_shown(browser)
    # Nothing wraps: each line of a card is one line (a long name ends in an ellipsis), times are whole.
    assert wrapped(browser, ".card .line, .card time, .toolbar label, .card .actions button") == []
    long_name = css(browser, f".card[data-id='{ids[0.5890]}'] .name")[0]
    assert browser.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", long_name)

    # Label a "no IDC" verdict as IDC: the page states the label, by whom and when, beside the model's.
    css(browser, "#reviewer")[0].send_keys("Dr Example")
    card = css(browser, f".card[data-id='{ids[0.4822]}']")[0]
    buttons = card.find_elements("css selector", ".actions button")
    assert [b.text for b in buttons] == ["IDC", "no IDC", "unsure"]
    buttons[0].click()
    wait_for(browser, lambda d: card.get_attribute("data-review-label") == "idc", "the label saved")
    reviewed = card.find_element("css selector", ".reviewed").text
    assert reviewed.startswith("Reviewed: IDC, by Dr Example, at 20") and reviewed.endswith(
        " UTC differs from the model"), reviewed
    assert card.find_element("css selector", ".model").text.startswith("Model: no IDC \u00b7 P(IDC) 0.4822")
    assert [b.get_attribute("aria-pressed") for b in buttons] == ["true", "false", "false"]
    assert "item %d saved: IDC (the model said no IDC)" % ids[0.4822] in browser.find_element("id", "status").text
    assert wrapped(browser, ".card .line, .card time") == []
    save_screenshot(browser, "review.png")

    # The filters: needs review only, one patient, disagreements (which shows reviewed items).
    pending = [row for row in pending if row[0] != 0.4822]
    css(browser, "#needs-review")[0].click()
    expect(uncertain(row for row in pending if row[2]), "needs review only")
    wait_for(browser, lambda d: css(d, "#patient option[value='10253']"), "the patients")
    assert [o.get_attribute("value") for o in css(browser, "#patient option")] == ["", "9036", "10253"]
    Select(css(browser, "#patient")[0]).select_by_value("10253")
    expect([0.5030], "patient 10253, needs review")
    css(browser, "#needs-review")[0].click()
    expect([0.5030, 0.8800], "patient 10253")
    css(browser, "#disagreements")[0].click()
    expect([], "patient 10253's disagreements: its one review agreed")
    assert Select(css(browser, "#filter")[0]).first_selected_option.get_attribute("value") == "reviewed"
    Select(css(browser, "#patient")[0]).select_by_value("")
    expect([0.4822], "the disagreements")
    Select(css(browser, "#filter")[0]).select_by_value("all")
    Select(css(browser, "#order")[0]).select_by_value("oldest")
    expect([0.4822], "the disagreements, all")
    css(browser, "#disagreements")[0].click()
    expect([row[0] for row in SEEDED], "all, oldest first")
    export = list(csv.DictReader(io.StringIO(requests.get(server.url + "/api/review/export.csv", timeout=10).text)))
    assert [(int(r["id"]), r["label"], r["model_label"], r["decision"], r["reviewer"]) for r in export] == [
        (ids[0.4822], "1", "0", "disagree", "Dr Example"), (ids[0.3990], "0", "0", "agree", "Dr Lee")]


def test_with_an_api_key_the_pages_refuse_until_it_is_entered(browser, serve, tiny_project):
    config, _ = tiny_project
    server = serve(api_key="browser-s3cret")
    requests.post(server.url + "/api/infer", data=(config.model_dir / "test" / "positive.png").read_bytes(),
                  headers={"Content-Type": "image/png", "X-API-Key": "browser-s3cret"}, timeout=10)
    assert requests.get(server.url + "/api/review/queue", timeout=10).status_code == 401
    browser.get(server.url + "/review")
    assert css(browser, "#login-form") and not css(browser, "#queue")
    css(browser, "#key")[0].send_keys("wrong")
    css(browser, "#login")[0].click()
    wait_for(browser, lambda d: "Wrong key" in d.find_element("id", "login-message").text, "the refusal")
    css(browser, "#key")[0].send_keys("browser-s3cret")
    css(browser, "#login")[0].click()
    wait_for(browser, lambda d: css(d, "#queue[data-loaded='yes']"), "the queue after the key")
    assert "waiting" in browser.find_element("id", "status").text
    assert "browser-s3cret" not in browser.current_url
    browser.get(server.url + "/")  # entered once: the other page opens too
    assert css(browser, "#drop") and not css(browser, "#login-form")
    cookies = browser.get_cookies()
    assert [c["name"] for c in cookies] == ["idc_session"] and cookies[0]["httpOnly"]
    assert "browser-s3cret" not in cookies[0]["value"]
