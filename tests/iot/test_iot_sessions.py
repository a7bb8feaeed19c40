"""No result lost between server and alarm: persistent sessions (real mosquitto, persistence on), late
results shown without the buzzer, late counts; and a bounded log in the review state."""

import json
import logging
import time

import pytest

from idc.edge.web.app import create_app
from idc.iot.alarm import IDC, REVIEW, Alarm, mock_pin_factory
from idc.iot.mqtt import client_id
from idc.iot.publisher import ResultPublisher
from tests.mosquitto import Probe, wait_until

SENSORS = "IDC/Devices/Lab/EdgeServer/Sensors"
ALARM_STATE = "IDC/Devices/Lab/IoTAlarm/Sensors"
REACTION_SECONDS = 2.0
IDC_PINS = {"red": True, "blue": False, "buzzer": True}


def pins(alarm, factory) -> dict:
    s = alarm.settings
    return {name: factory.pin(number).state for name, number in
            (("red", s.red_led_pin), ("blue", s.blue_led_pin), ("buzzer", s.buzzer_pin))}


def alarm_went_away(config) -> None:
    """The alarm has run once (the broker now holds its session) and is gone: a Pi switched off."""
    alarm = Alarm(config).start()
    assert alarm.connection.wait_connected(5)
    alarm.close()


def publish_results(broker, make_config, *results, **mqtt) -> ResultPublisher:
    publisher = ResultPublisher(make_config(broker, name="server.json", IoTJumpWay=mqtt)).start()
    assert publisher.connection.wait_connected(5)
    for result in results:
        assert publisher.publish_result(*result)
    assert publisher.flush(5), publisher.status()
    return publisher


def test_the_alarm_has_a_fixed_client_id_and_asks_for_a_persistent_session(make_config, mock_pins):
    config = make_config()
    alarm = Alarm(config)
    try:
        assert alarm.connection.client._client_id == client_id(config.mqtt, "IoTAlarm").encode()
        assert config.mqtt.session_expiry == 86400
    finally:
        alarm.close()


@pytest.mark.parametrize("restart_broker", [False, True])
def test_a_result_published_while_the_alarm_is_away_sounds_it_when_it_returns(
        mosquitto_persistent, make_config, mock_pins, restart_broker):
    broker = mosquitto_persistent
    config = make_config(broker, Alarm={"buzzer_seconds": 30.0})
    alarm_went_away(config)
    # Two results while it is away: the last one decides, so order matters.
    publish_results(broker, make_config, (0, 0.1, False), (1, 0.9, False)).stop()
    if restart_broker:
        broker.restart()  # sessions and their queued messages are on disk (persistence true)

    started = time.monotonic()
    alarm = Alarm(config).start()
    try:
        assert alarm.connection.wait_connected(10)
        assert wait_until(lambda: pins(alarm, mock_pins) == IDC_PINS, REACTION_SECONDS), \
            (pins(alarm, mock_pins), alarm.state, broker.log()[-2000:])
        print(f"late result shown {time.monotonic() - started:.3f} s after the alarm started")
        assert alarm.handled == 2 and alarm.state == IDC and not alarm.stale  # both results, in order
    finally:
        alarm.close()


def test_a_result_older_than_stale_after_seconds_lights_the_led_without_the_buzzer(
        mosquitto_persistent, make_config, mock_pins):
    broker = mosquitto_persistent
    config = make_config(broker, IoTJumpWay={"stale_after_seconds": 1.0}, Alarm={"buzzer_seconds": 30.0})
    alarm_went_away(config)
    publish_results(broker, make_config, (1, 0.9, False), stale_after_seconds=1.0).stop()
    time.sleep(1.5)  # the Pi stays away longer than stale_after_seconds

    probe = Probe(broker, [ALARM_STATE])
    alarm = Alarm(config).start()
    try:
        assert alarm.connection.wait_connected(10)
        assert wait_until(lambda: alarm.state == IDC, REACTION_SECONDS)
        time.sleep(0.3)  # the buzzer would have started with the red LED
        assert pins(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": False}
        assert alarm.stale and alarm.late == 1

        def last_state():
            return json.loads(probe.received(ALARM_STATE)[-1]) if probe.received(ALARM_STATE) else {}
        assert wait_until(lambda: last_state().get("State") == IDC, REACTION_SECONDS)
        assert last_state()["Stale"] is True and last_state()["Late"] == 1
        # A fresh result afterwards sounds again.
        live = ResultPublisher(make_config(broker, name="server2.json")).start()
        try:
            assert live.connection.wait_connected(5) and live.publish_result(1, 0.8, False)
            assert wait_until(lambda: pins(alarm, mock_pins)["buzzer"], REACTION_SECONDS)
            assert not alarm.stale
        finally:
            live.stop()
    finally:
        alarm.close()
        probe.close()


def test_the_server_counts_results_delivered_late_in_its_health(mosquitto_persistent, make_config):
    broker = mosquitto_persistent
    config = make_config(broker, IoTJumpWay={"stale_after_seconds": 1.0})
    publisher = ResultPublisher(config).start()
    try:
        assert publisher.connection.wait_connected(5)
        assert publisher.publish_result(0, 0.2, False)  # on time
        assert publisher.flush(5)
        broker.stop()
        assert wait_until(lambda: not publisher.status()["connected"], 5)
        publisher.publish_result(1, 0.9, False)
        publisher.publish_result(0, 0.1, False)
        time.sleep(1.2)
        broker.start()
        assert publisher.connection.wait_connected(10) and publisher.flush(5)
        health = create_app(config, None, publisher).test_client().get("/api/health").get_json()
        assert health["mqtt"]["late"] == 2 and health["mqtt"]["published"] == 4, health["mqtt"]
    finally:
        publisher.stop()


def test_ten_seconds_of_the_review_state_write_a_bounded_number_of_log_lines(make_config, caplog):
    caplog.set_level(logging.INFO)
    alarm = Alarm(make_config(), pin_factory=mock_pin_factory())  # the pins of iot_alarm.py --mock
    try:
        caplog.clear()
        alarm.handle_message(SENSORS, json.dumps(
            {"Sensor": "CCTV", "Results": 1, "Confidence": 0.55, "NeedsReview": True}).encode())
        assert alarm.state == REVIEW
        time.sleep(10)
        red = alarm.red.pin
        assert len(red.states) > 30, "the red LED should have blinked all along"
        lines = [r.getMessage() for r in caplog.records]
        print(f"{len(lines)} log lines in 10 s of review state, red LED changed {len(red.states)} times")
        assert len(lines) <= 3, lines
        assert any("REVIEW" in line for line in lines)
        # Leaving the review state logs the pins again.
        caplog.clear()
        alarm.handle_message(SENSORS, json.dumps({"Sensor": "CCTV", "Results": 1}).encode())
        assert "pin GPIO17 (red LED) -> HIGH" in caplog.text and "pin GPIO22 (buzzer) -> HIGH" in caplog.text
    finally:
        alarm.close()
