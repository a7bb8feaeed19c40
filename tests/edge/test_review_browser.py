"""The review station in a real headless browser: Debian's chromium driven by selenium through
Debian's chromedriver (apt-get install chromium chromium-driver; .ci/run installs them), against
server.py on 127.0.0.1. Nothing downloads a browser; without chromium/chromedriver these tests skip.
The two screenshots of the README are taken here: into docs/screenshots/ with
IDC_SCREENSHOTS=1 (to refresh them), else into a temporary folder, so a test run leaves the
checkout unchanged."""

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import requests

from tests.paths import ROOT
from tests.mosquitto import free_port, wait_until
from tests.synthetic import make_dataset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "docs" / "screenshots" if os.environ.get("IDC_SCREENSHOTS") else None
WAIT = 30  # seconds: every wait below is bounded


def _browser_or_skip():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver): the browser tests need them")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1150,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='idc-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser():
    driver = _browser_or_skip()
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


class Server:
    """server.py in a subprocess on a free port; .restart() keeps its config (and review db)."""

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path, self.log_path, self.port = config_path, log_path, free_port()
        self.url, self.process = f"http://127.0.0.1:{self.port}", None

    def start(self):
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--config", str(self.config_path), "--port", str(self.port),
             "--precision", "FP16", "--threshold", "0.5", "--review-band", "0.499999"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
        log.close()

        def up():
            try:
                return requests.get(f"{self.url}/api/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        assert wait_until(up, timeout=60), self.log_path.read_text()[-3000:]
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def restart(self):
        self.stop()
        return self.start()


@pytest.fixture
def serve(tiny_project, tiny_classifier, make_config, tmp_path):
    """serve(**Server keys) -> a running server.py on the tiny model, its review db in tmp_path."""
    model_config, _ = tiny_project
    servers = []

    def start(**server):
        config = make_config(name=f"confs-{len(servers)}.json",
                             ClassifierSettings={"model_dir": str(model_config.model_dir), "image_size": 75},
                             Server={"review_db": str(tmp_path / "review.sqlite3"), **server})
        servers.append(Server(config.path, tmp_path / "server.log").start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return wait.until(lambda d: condition(d), message=what)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


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
    assert len(css(browser, "#results tbody tr")) == 18
    assert browser.execute_script("""const c = document.querySelector('.mosaic canvas');
        return [c.width, c.height, c.getContext('2d').getImageData(5, 5, 1, 1).data[3]];""")[2] > 0
    save_screenshot(browser, "classify.png")

    # The queue: every patch was flagged (a review band of almost 0.5); review the positive one.
    browser.get(server.url + "/review")
    wait_for(browser, lambda d: css(d, "#queue[data-loaded='yes'] .card"), "the review queue")
    cards = css(browser, ".card")
    assert len(cards) == 18
    card = next(c for c in cards if c.find_element("css selector", ".name").text == "positive.png")
    item_id = card.get_attribute("data-id")
    css(browser, "#reviewer")[0].send_keys("Dr Example")
    card.find_element("css selector", "textarea").send_keys("tumour nests, agree")
    card.find_element("css selector", "button.disagree").click()
    wait_for(browser, lambda d: css(d, f".card[data-id='{item_id}'][data-decision='disagree']"), "the decision")
    assert "by Dr Example" in css(browser, f".card[data-id='{item_id}'] .decision")[0].text
    save_screenshot(browser, "review.png")

    # Restart the server: the review is still there, and in the CSV export.
    server.restart()
    browser.get(server.url + "/review")
    css(browser, "#filter option[value='reviewed']")[0].click()
    wait_for(browser, lambda d: css(d, f".card[data-id='{item_id}'][data-decision='disagree']"), "the review kept")
    export = requests.get(server.url + "/api/review/export.csv", timeout=10)
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [(r["id"], r["file"], r["decision"], r["reviewer"], r["note"], r["label"]) for r in rows] == [
        (item_id, "positive.png", "disagree", "Dr Example", "tumour nests, agree", "0")]


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
