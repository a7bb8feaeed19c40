"""End to end, all on 127.0.0.1: the edge server (waitress in a thread, the tiny trained model compiled to
OpenVINO IR) publishes every result to a real mosquitto; the alarm (gpiozero mock pins) subscribed to the
server's Sensors topic drives its LEDs and buzzer. Images are POSTed over HTTP, as client.py does.

Every wait is a bounded poll: REACTION_SECONDS for the pins to follow a result, RECONNECT_SECONDS for
paho's own reconnect (first retry after 1 s, doubling up to 30 s) once the broker is back.
"""

import json
import os
import subprocess
import sys

import pytest
import requests

from idc.iot.alarm import IDC, IDLE, NO_IDC, Alarm
from idc.edge.web.app import create_app
from idc.iot.mqtt import ONLINE, device_topic
from idc.iot.publisher import ResultPublisher
from tests.paths import ROOT
from tests.mosquitto import Probe, wait_until

REACTION_SECONDS = 2.0
RECONNECT_SECONDS = 15.0
CONNECT_SECONDS = 10.0
ALL_OFF = {"red": False, "blue": False, "buzzer": False}
IDC_PINS = {"red": True, "blue": False, "buzzer": True}
NO_IDC_PINS = {"red": False, "blue": True, "buzzer": False}


@pytest.fixture
def images(tiny_project):
    config, _ = tiny_project
    test = config.model_dir / "test"
    return {"positive": (test / "positive.png").read_bytes(), "negative": (test / "negative.png").read_bytes()}


@pytest.fixture
def edge(mosquitto, make_config, tiny_classifier, live_server):
    """The edge server as server.py runs it (its ResultPublisher started from the config, the app served by
    waitress), with IoTJumpWay enabled and pointed at the test broker. Yields (config, url, publisher)."""
    config = make_config(mosquitto)
    assert config.mqtt.enabled and config.mqtt.port == mosquitto.port
    publisher = ResultPublisher(config).start()
    try:
        url = live_server(create_app(config, tiny_classifier, publisher), config)
        yield config, url, publisher
    finally:
        publisher.stop()


@pytest.fixture
def alarm(edge, mock_pins):
    """The Raspberry Pi alarm, in-process on gpiozero mock pins, with the shipped Alarm settings
    (it watches the edge server's Sensors topic)."""
    config, _, _ = edge
    alarm = Alarm(config).start()  # pins from the default (mock) factory
    yield alarm
    alarm.close()


def pins(alarm, factory) -> dict:
    """The real levels of the configured pins."""
    settings = alarm.settings
    return {name: factory.pin(number).state for name, number in
            (("red", settings.red_led_pin), ("blue", settings.blue_led_pin), ("buzzer", settings.buzzer_pin))}


def infer(url: str, image: bytes, expected: int) -> dict:
    response = requests.post(f"{url}/api/infer", data=image, headers={"Content-Type": "image/png"}, timeout=10)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["Response"] == "OK" and answer["Results"] == expected, answer
    # A patch flagged for review would blink the red LED instead: the test images must be clear cases.
    assert answer["NeedsReview"] is False, answer
    return answer


def assert_pins_become(alarm, factory, expected: dict, timeout: float = REACTION_SECONDS) -> None:
    assert wait_until(lambda: pins(alarm, factory) == expected, timeout), \
        f"pins {pins(alarm, factory)}, expected {expected} within {timeout} s (alarm state {alarm.state})"


def test_the_alarm_watches_the_servers_sensors_topic(edge, alarm):
    config, _, _ = edge
    assert alarm.settings.topics == [device_topic(config.mqtt, config.mqtt.Server, "Sensors")]


def test_a_positive_patch_sounds_the_alarm_and_a_negative_one_turns_it_blue(edge, alarm, mock_pins, images):
    config, url, publisher = edge
    assert alarm.connection.wait_connected(CONNECT_SECONDS) and publisher.connection.wait_connected(CONNECT_SECONDS)
    assert alarm.state == IDLE and pins(alarm, mock_pins) == ALL_OFF

    infer(url, images["positive"], 1)
    assert_pins_become(alarm, mock_pins, IDC_PINS)
    assert alarm.state == IDC and alarm.origin == config.mqtt.Server

    infer(url, images["negative"], 0)
    assert_pins_become(alarm, mock_pins, NO_IDC_PINS)
    assert alarm.state == NO_IDC

    infer(url, images["positive"], 1)  # and back again
    assert_pins_become(alarm, mock_pins, IDC_PINS)
    assert alarm.ignored == 0


def test_broker_restart_mid_run_the_server_keeps_answering_and_the_alarm_comes_back(
        edge, alarm, mosquitto, mock_pins, images):
    _, url, publisher = edge
    assert alarm.connection.wait_connected(CONNECT_SECONDS) and publisher.connection.wait_connected(CONNECT_SECONDS)
    infer(url, images["positive"], 1)
    assert_pins_become(alarm, mock_pins, IDC_PINS)

    mosquitto.stop()
    assert wait_until(lambda: not alarm.connected and not publisher.status()["connected"], 5)
    with requests.Session() as session:  # the broker is down: HTTP is not affected
        for name, label in (("negative", 0), ("positive", 1), ("positive", 1)):
            response = session.post(f"{url}/api/infer", data=images[name], timeout=10)
            assert response.status_code == 200 and response.json()["Results"] == label, response.text
        health = session.get(f"{url}/api/health", timeout=10)
        assert health.status_code == 200 and health.json()["mqtt"]["connected"] is False
    # Queued results are not yet sent, and the alarm, cut off, still shows the last result it got.
    assert alarm.state == IDC and pins(alarm, mock_pins)["red"]

    mosquitto.start()  # same port
    assert alarm.connection.wait_connected(RECONNECT_SECONDS), "the alarm did not reconnect by itself"
    assert publisher.connection.wait_connected(RECONNECT_SECONDS), "the server did not reconnect by itself"
    # What the server queued during the outage goes out now (positives: the alarm may show them again).
    assert publisher.flush(5), publisher.status()

    infer(url, images["negative"], 0)
    assert_pins_become(alarm, mock_pins, NO_IDC_PINS)
    infer(url, images["positive"], 1)
    assert_pins_become(alarm, mock_pins, IDC_PINS)
    assert requests.get(f"{url}/api/health", timeout=10).json()["mqtt"]["connected"] is True


def test_client_and_alarm_scripts_as_processes(edge, mosquitto, tiny_project, tmp_path):
    """client.py posts the two test images to the server; iot_alarm.py --mock shows them on its pins."""
    config, url, publisher = edge
    alarm_topic = device_topic(config.mqtt, config.mqtt.Alarm, "Status").rsplit("/", 1)[0]
    probe = Probe(mosquitto, [f"{alarm_topic}/#"])
    log_path = tmp_path / "iot_alarm.log"
    with log_path.open("wb") as log:
        alarm = subprocess.Popen([sys.executable, str(ROOT / "iot_alarm.py"), "--mock", "--config", str(config.path)],
                                 stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert probe.wait_for(f"{alarm_topic}/Status", ONLINE.encode(), timeout=30), log_path.read_text()
        assert publisher.connection.wait_connected(CONNECT_SECONDS)
        project, _ = tiny_project
        test = project.model_dir / "test"
        done = subprocess.run([sys.executable, str(ROOT / "client.py"), "--server", url,
                               test / "positive.png", test / "negative.png"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "IDC: 1, no IDC: 1, needs review: 0, failed: 0" in done.stdout, done.stdout

        def states():
            return [json.loads(p)["State"] for p in probe.received(f"{alarm_topic}/Sensors")]
        assert wait_until(lambda: states()[-2:] == [IDC, NO_IDC], REACTION_SECONDS * 2), (states(), log_path.read_text())
        assert states() == [IDLE, IDC, NO_IDC]
        log_text = log_path.read_text()
        # The mock pins log every change: red and buzzer on for IDC, then blue on and red off.
        pin_changes = [line.split("pin ", 1)[1] for line in log_text.splitlines() if " pin GPIO" in line]
        red, blue, buzzer = (f"GPIO{config.Alarm.red_led_pin} (red LED)", f"GPIO{config.Alarm.blue_led_pin} (blue LED)",
                             f"GPIO{config.Alarm.buzzer_pin} (buzzer)")
        assert pin_changes[:2] == [f"{red} -> HIGH", f"{buzzer} -> HIGH"], log_text
        assert {f"{red} -> LOW", f"{buzzer} -> LOW", f"{blue} -> HIGH"} <= set(pin_changes), log_text
        assert pin_changes[-1] == f"{blue} -> HIGH", log_text
        assert "Traceback" not in log_text
        alarm.terminate()
        assert alarm.wait(timeout=10) == 0, log_path.read_text()  # a clean stop on SIGTERM
    finally:
        if alarm.poll() is None:
            alarm.kill()
            alarm.wait(timeout=5)
        probe.close()
