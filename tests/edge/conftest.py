"""Fixtures of the edge tests."""

import pytest

from tests.edge.browser import start_browser


@pytest.fixture
def browser():
    """A headless chromium (Debian's), quit after the test; the test skips where it is not installed."""
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def flagging_classifier(tiny_project, tiny_classifier):
    """The tiny FP16 model with a review band so wide that every patch or tile is flagged for review."""
    from idc.edge.engine import load_classifier

    config, _ = tiny_project
    return load_classifier(config, "FP16", threshold=0.5, review_band=0.499999)
