"""Nothing lost and nothing replayed across a broker crash (SIGKILL, as a power cut): a real mosquitto
with the shipped persistence settings (examples/mosquitto/idc.conf), and the alarm's memory of what
it has shown (Alarm.state_file)."""

import json
import time

import pytest

from idc.iot.alarm import IDC, IDLE, NO_IDC, Alarm
from idc.iot.publisher import ResultPublisher
from tests.mosquitto import Mosquitto, find_tool, wait_until

SENSORS = "IDC/Devices/Lab/EdgeServer/Sensors"


def buzzer_on(alarm) -> bool:
    return bool(alarm.buzzer.value)


def publish(broker, make_config, *results) -> None:
    """The edge server publishes results, each acknowledged by the broker, and stops."""
    with ResultPublisher(make_config(broker, name="server.json")) as server:
        assert server.connection.wait_connected(5)
        for result in results:
            assert server.publish_result(*result)
        assert server.flush(5), server.status()


def alarm_went_away(config) -> None:
    """The alarm has run once (the broker holds its session) and is gone: a Pi switched off."""
    alarm = Alarm(config).start()
    assert alarm.connection.wait_connected(5)
    alarm.close()


@pytest.fixture
def replaying_broker(tmp_path):
    """A persistent mosquitto with its own defaults (saved on a clean stop and every 30 min), not the
    shipped settings: after a crash it restores an older state and redelivers results already shown."""
    if find_tool("mosquitto") is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto): MQTT tests need a real broker")
    broker = Mosquitto(tmp_path / "replaying", persistence=True, autosave=False)
    broker.start()
    yield broker
    broker.stop()


def test_a_result_waiting_for_the_alarm_survives_a_broker_crash(mosquitto_persistent, make_config, mock_pins):
    broker = mosquitto_persistent
    config = make_config(broker, Alarm={"buzzer_seconds": 30.0})
    alarm_went_away(config)
    publish(broker, make_config, (1, 0.9, False))
    broker.crash()
    broker.start()
    alarm = Alarm(config).start()
    try:
        assert wait_until(lambda: alarm.state == IDC, 5), broker.log()[-2000:]
        assert buzzer_on(alarm) and alarm.handled == 1
    finally:
        alarm.close()


def test_a_returning_alarm_does_not_sound_again_for_a_result_a_crashed_broker_replays(
        replaying_broker, make_config, mock_pins):
    broker = replaying_broker
    config = make_config(broker, Alarm={"buzzer_seconds": 30.0})
    alarm_went_away(config)
    publish(broker, make_config, (1, 0.9, False))  # waits in the alarm's session...
    broker.restart()  # ...and is saved there by a clean restart
    alarm = Alarm(config).start()
    try:
        assert wait_until(lambda: alarm.state == IDC and buzzer_on(alarm), 5)  # shown once
        publish(broker, make_config, (0, 0.1, False))
        assert wait_until(lambda: alarm.state == NO_IDC, 5)
    finally:
        alarm.close()  # the Pi goes away again
    broker.crash()  # the broker's saved state still has the IDC result waiting for the alarm
    broker.start()
    alarm = Alarm(config).start()  # a new process: it knows what it showed from Alarm.state_file
    try:
        assert alarm.connection.wait_connected(5)
        assert wait_until(lambda: alarm.ignored + alarm.handled >= 1 or alarm.state == IDC, 3)
        time.sleep(0.5)
        assert alarm.state != IDC and not buzzer_on(alarm), "a replayed result sounded the buzzer again"
    finally:
        alarm.close()


def test_a_result_older_than_one_already_shown_is_ignored_even_after_a_restart(make_config, mock_pins):
    config = make_config()
    newer = {"Sensor": "CCTV", "Results": 0, "Time": "2026-12-02T10:00:05.000+00:00"}
    older = {"Sensor": "CCTV", "Results": 1, "Time": "2026-12-02T10:00:01.000+00:00"}
    alarm = Alarm(config)
    try:
        assert alarm.handle_message(SENSORS, json.dumps(newer).encode()) == NO_IDC
        assert alarm.handle_message(SENSORS, json.dumps(older).encode()) == NO_IDC and not buzzer_on(alarm)
    finally:
        alarm.close()
    saved = json.loads(config.resolve(config.Alarm.state_file).read_text())
    assert saved == {"newest_shown": {"EdgeServer": "2026-12-02T10:00:05.000+00:00"}}
    alarm = Alarm(config)  # restarted
    try:
        assert alarm.handle_message(SENSORS, json.dumps(older).encode()) == IDLE
        later = {**older, "Time": "2026-12-02T10:00:09.000+00:00"}
        assert alarm.handle_message(SENSORS, json.dumps(later).encode()) == IDC  # a newer result still shows
    finally:
        alarm.close()


def test_an_unreadable_state_file_is_logged_and_the_alarm_starts_without_it(make_config, mock_pins, caplog):
    config = make_config()
    config.resolve(config.Alarm.state_file).write_text("{not json")
    alarm = Alarm(config)
    try:
        assert "is unreadable" in caplog.text
        older = {"Sensor": "CCTV", "Results": 1, "Time": "2026-12-02T10:00:01.000+00:00"}
        assert alarm.handle_message(SENSORS, json.dumps(older).encode()) == IDC
    finally:
        alarm.close()


def test_a_result_stamped_far_in_the_future_does_not_hide_later_ones(make_config, mock_pins):
    """A server whose clock was once set years ahead must not silence the alarm until then."""
    config = make_config()
    alarm = Alarm(config)
    try:
        future = {"Sensor": "CCTV", "Results": 0, "Time": "2099-01-01T00:00:00.000+00:00"}
        assert alarm.handle_message(SENSORS, json.dumps(future).encode()) == NO_IDC  # shown, not remembered
        now = {"Sensor": "CCTV", "Results": 1, "Time": "2026-12-02T10:00:01.000+00:00"}
        assert alarm.handle_message(SENSORS, json.dumps(now).encode()) == IDC
    finally:
        alarm.close()
