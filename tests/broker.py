"""A real mosquitto started for a test, or the test skipped when mosquitto is not installed (a support
module: the conftest fixtures and tests that need a broker of their own use it)."""

from pathlib import Path

import pytest

from tests.mosquitto import Mosquitto, find_tool


def started_broker(workdir: Path, **options) -> Mosquitto:
    """A started Mosquitto(workdir, **options); skips the test when mosquitto (or, with `users`,
    mosquitto_passwd) is not installed."""
    for tool in ("mosquitto", "mosquitto_passwd") if options.get("users") else ("mosquitto",):
        if find_tool(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install mosquitto): MQTT tests need a real broker")
    broker = Mosquitto(workdir, **options)
    broker.start()
    return broker
