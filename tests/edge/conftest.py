"""Fixtures of the edge tests."""

import pytest

from tests.edge.browser import start_browser


@pytest.fixture
def browser():
    """A headless chromium (Debian's), quit after the test; the test skips where it is not installed."""
    driver = start_browser()
    yield driver
    driver.quit()
