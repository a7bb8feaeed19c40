"""What the browser tests share: Debian's chromium driven by selenium through Debian's chromedriver
(apt-get install chromium chromium-driver; .ci/run installs them; nothing downloads a browser, and
without them the tests skip), server.py in a subprocess on 127.0.0.1, and bounded waits. The
`browser` fixture is in tests/edge/conftest.py."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from tests.mosquitto import free_port, wait_until
from tests.paths import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
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


def start_browser():
    """A headless chromium (skips the test where it is not installed), its page and script waits bounded."""
    driver = _browser_or_skip()
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver


class Server:
    """server.py in a subprocess on a free port; .restart() keeps its config (and review db)."""

    def __init__(self, config_path: Path, log_path: Path, rule=("0.5", "0.499999")):
        self.config_path, self.log_path, self.port = config_path, log_path, free_port()
        self.url, self.process, self.rule = f"http://127.0.0.1:{self.port}", None, rule

    def start(self):
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--config", str(self.config_path), "--port", str(self.port),
             "--precision", "FP16", "--threshold", self.rule[0], "--review-band", self.rule[1]],
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


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return wait.until(lambda d: condition(d), message=what)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)
