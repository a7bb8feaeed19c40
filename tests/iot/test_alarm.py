"""idc.iot.alarm and iot_alarm.py: pins driven through gpiozero's mock factory, messages direct and over a real broker."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from idc.iot.alarm import IDC, IDLE, NO_IDC, REVIEW, Alarm
from idc.iot.mqtt import OFFLINE, ONLINE, encode, sensors_payload, warnings_payload
from idc.iot.publisher import ResultPublisher
from tests.mosquitto import Probe, wait_until
from tests.paths import ROOT

SERVER = "IDC/Devices/Lab/EdgeServer"
ALARM = "IDC/Devices/Lab/IoTAlarm"
SENSORS, WARNINGS, COMMANDS = f"{SERVER}/Sensors", f"{SERVER}/Warnings", f"{ALARM}/Commands"
REACTION_SECONDS = 2.0


def sensors(results, needs_review=False, confidence=0.9, device="EdgeServer") -> bytes:
    return encode(sensors_payload(device, results, confidence, needs_review))


def warning(needs_review=False) -> bytes:
    return encode(warnings_payload("EdgeServer", 1, 0.9, needs_review))


ACK = encode({"Command": "ACK"})


@pytest.fixture
def make_alarm(mock_pins, make_config):
    """make_alarm(broker=None, **alarm_settings) -> an Alarm on mock pins (closed after the test)."""
    alarms = []

    def make(broker=None, **alarm_settings):
        alarm_settings.setdefault("buzzer_seconds", 30.0)
        alarm_settings.setdefault("topics", [SENSORS, WARNINGS])
        alarm = Alarm(make_config(broker, Alarm=alarm_settings))
        alarms.append(alarm)
        return alarm

    yield make
    for alarm in alarms:
        alarm.close()


def levels(alarm, factory) -> dict:
    """The real pin levels, looked up by the configured pin numbers."""
    pins = alarm.settings
    return {name: factory.pin(number).state for name, number in
            (("red", pins.red_led_pin), ("blue", pins.blue_led_pin), ("buzzer", pins.buzzer_pin))}


def snapshot(alarm, factory):
    """Everything a message could change: state, flags, pin levels and the pins' change histories."""
    pins = [alarm.settings.red_led_pin, alarm.settings.blue_led_pin, alarm.settings.buzzer_pin]
    history = [(factory.pin(n).state, len(factory.pin(n).states)) for n in pins]
    return alarm.state, alarm.origin, alarm.acknowledged, alarm.handled, history


# --- logic, messages handed to handle_message() directly ---

def test_starts_idle_with_everything_off(make_alarm, mock_pins):
    alarm = make_alarm()
    assert alarm.state == IDLE
    assert levels(alarm, mock_pins) == {"red": False, "blue": False, "buzzer": False}


def test_idc_turns_red_and_buzzer_on_and_the_buzzer_stops_by_itself(make_alarm, mock_pins):
    alarm = make_alarm(buzzer_seconds=0.3)
    assert alarm.handle_message(SENSORS, sensors(1)) == IDC
    assert levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": True}
    assert wait_until(lambda: not levels(alarm, mock_pins)["buzzer"], 2)
    buzzer_pin = mock_pins.pin(alarm.settings.buzzer_pin)
    assert buzzer_pin.states[-1].timestamp == pytest.approx(0.3, abs=0.15)  # on for buzzer_seconds
    assert levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": False}


def test_no_idc_turns_blue_on_and_red_and_buzzer_off(make_alarm, mock_pins):
    alarm = make_alarm()
    alarm.handle_message(SENSORS, sensors(1))
    assert alarm.handle_message(SENSORS, sensors(0, confidence=0.1)) == NO_IDC
    assert levels(alarm, mock_pins) == {"red": False, "blue": True, "buzzer": False}


def test_a_warning_raises_the_alarm(make_alarm, mock_pins):
    alarm = make_alarm()
    assert alarm.handle_message(WARNINGS, warning()) == IDC
    assert levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": True}


def test_the_2018_payload_with_only_sensor_value_is_understood(make_alarm, mock_pins):
    alarm = make_alarm()
    original = {"Sensor": "CCTV", "SensorID": "EdgeServer", "SensorValue": "IDC: 1 (Confidence: 0.92)"}
    assert alarm.handle_message(SENSORS, encode(original)) == IDC
    original["SensorValue"] = "IDC: 0 (Confidence: 0.08)"
    assert alarm.handle_message(SENSORS, encode(original)) == NO_IDC


@pytest.mark.parametrize("results", [0, 1])
def test_needs_review_blinks_the_red_led_whatever_the_result(make_alarm, mock_pins, results):
    alarm = make_alarm()
    alarm.handle_message(SENSORS, sensors(0))  # blue on before, so we see it go off
    assert alarm.handle_message(SENSORS, sensors(results, needs_review=True, confidence=0.55)) == REVIEW
    seen = set()
    wait_until(lambda: seen.add(levels(alarm, mock_pins)["red"]) or seen == {True, False}, 2)
    assert seen == {True, False}, "the red LED should blink"
    assert not levels(alarm, mock_pins)["blue"] and not levels(alarm, mock_pins)["buzzer"]
    assert alarm.handle_message(WARNINGS, warning(needs_review=True)) == REVIEW


def test_ack_command_silences_the_buzzer_and_keeps_the_red_led(make_alarm, mock_pins):
    alarm = make_alarm()
    alarm.handle_message(SENSORS, sensors(1))
    assert alarm.handle_message(f"{SERVER}/Commands", ACK) is None  # not the alarm's own channel
    assert levels(alarm, mock_pins)["buzzer"]
    assert alarm.handle_message(COMMANDS, ACK) == IDC
    assert levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": False}
    assert alarm.acknowledged


def test_the_button_silences_the_buzzer(make_alarm, mock_pins):
    alarm = make_alarm(button_pin=5)
    alarm.handle_message(SENSORS, sensors(1))
    mock_pins.pin(5).drive_low()  # pressed (pull-up button)
    assert wait_until(lambda: not levels(alarm, mock_pins)["buzzer"], REACTION_SECONDS)
    mock_pins.pin(5).drive_high()  # released
    assert levels(alarm, mock_pins)["red"] and alarm.acknowledged


def test_one_alarm_watches_several_servers_and_ignores_itself(make_alarm, mock_pins):
    alarm = make_alarm(topics=["IDC/Devices/Lab/+/Sensors"])
    assert alarm.handle_message("IDC/Devices/Lab/ServerA/Sensors", sensors(1, device="ServerA")) == IDC
    assert alarm.origin == "ServerA"
    assert alarm.handle_message("IDC/Devices/Lab/ServerB/Sensors", sensors(0, device="ServerB")) == NO_IDC
    assert alarm.origin == "ServerB"
    # Its own state matches the filter too, and must not be taken for a result.
    assert alarm.handle_message(f"{ALARM}/Sensors", sensors(1)) is None
    assert alarm.state == NO_IDC


def malformed_messages(max_payload_bytes: int) -> list[tuple[str, bytes]]:
    """More than 200 messages the alarm must ignore, all on topics it subscribes to."""
    rng = random.Random(2018)
    valid = sensors_payload("EdgeServer", 1, 0.9, False)
    cases = [(SENSORS, raw) for raw in [
        b"", b"{", b"}", b"not json", b"IDC: 1", b"ONLINE", b"\x00", b"\xff\xfe\xfd", b'{"Results": 1',
        b"NaN", b"[" * 3000, b'{"a":' * 800, b"\xff" + encode(valid), b"\x00" * 100,
        b'{"Sensor": "CCTV", "Results": 1, "Confidence": NaN}',
        b'{"Sensor": "CCTV", "Results": 1, "Confidence": Infinity}',
    ]]
    cases += [(SENSORS, rng.randbytes(rng.randint(1, 3000))) for _ in range(60)]  # binary
    cases += [(SENSORS, json.dumps(value).encode())  # JSON, but not an object
              for value in [1, 1.5, "IDC", None, True, [], [valid], ["Results", 1]]]
    base = {"Sensor": "CCTV", "SensorID": "EdgeServer"}
    cases += [(SENSORS, encode({**base, "Results": v})) for v in ["1", 1.0, True, 2, -1, None, [1], {"v": 1}]]
    cases += [(SENSORS, encode({**base, "SensorValue": v}))
              for v in [1, "IDC: 2 (Confidence: 0.9)", "IDC 1", "", None, ["IDC: 1"]]]
    cases += [(SENSORS, encode({**base, "Results": 1, "NeedsReview": v})) for v in ["true", 1, None, "yes", [True]]]
    cases += [(SENSORS, encode({**base, "Results": 1, "Confidence": v})) for v in ["0.9", 1.5, -0.2, True, None]]
    cases += [(SENSORS, encode({**base, "Results": 1, "SensorValue": "IDC: 0 (Confidence: 0.1)"}))]
    cases += [(SENSORS, encode({**valid, "Sensor": v})) for v in ["Alarm", "cctv", 1, None]]
    cases += [(SENSORS, encode(v)) for v in [
        {}, {"Foo": 1}, {"Sensor": "CCTV", "Resultz": 1}, {"Sensor": "Alarm", "State": "IDC"}, {"Command": "ACK"},
        {"WarningType": "CCTV", "WarningValue": "RECOGNISED"},
    ]]
    warning_base = {"WarningType": "CCTV", "WarningValue": "RECOGNISED"}
    cases += [(WARNINGS, encode(v)) for v in [
        {"WarningType": "CCTV", "WarningValue": "NOT_RECOGNISED"}, {"WarningValue": "RECOGNISED"},
        {**warning_base, "Results": 0}, {**warning_base, "Results": "1"}, {**warning_base, "NeedsReview": "no"},
        {**warning_base, "Confidence": 7}, {"WarningType": 1}, {"Sensor": "CCTV", "Results": 1}, [warning_base],
    ]]
    cases += [(WARNINGS, b"\x80" * 10), (WARNINGS, b"")]
    # Oversized: a valid IDC result padded past the limit would raise the alarm if the size check failed.
    cases += [(SENSORS, encode({**valid, "Padding": "x" * size}))
              for size in (max_payload_bytes, 10 * max_payload_bytes, 1_000_000)]
    cases += [(COMMANDS, raw) for raw in [
        encode({"Command": "FIRE"}), encode({"Command": 1}), encode({"Command": ["ACK"]}), b"ACK",
        encode({"command": "ACK"}), encode({}), b"\xff\x00", encode({"Command": "ACK" * 2000})]]
    while len(cases) < 220:  # random objects with unknown fields
        fields = {f"field{rng.randint(0, 99)}": rng.choice([rng.random(), "x", None, [1, 2], {"Results": 1}])
                  for _ in range(rng.randint(1, 6))}
        fields["Sensor"] = rng.choice(["CCTV", "Alarm", "Camera"])
        cases.append((rng.choice([SENSORS, WARNINGS]), encode(fields)))
    return cases


def test_malformed_messages_are_ignored_and_leave_the_pins_alone(make_alarm, mock_pins, caplog):
    alarm = make_alarm()
    alarm.handle_message(SENSORS, sensors(0))
    before = snapshot(alarm, mock_pins)
    cases = malformed_messages(alarm.settings.max_payload_bytes)
    unexpected = [  # topics it does not watch, or not as a result
        ("IDC/Devices/Lab/OtherServer/Sensors", sensors(1)), (f"{ALARM}/Sensors", sensors(1)),
        (f"{SERVER}/Status", b"ONLINE"), (f"{SENSORS}/extra", sensors(1)), ("", sensors(1)),
        (None, sensors(1)), (SENSORS, "a str, not bytes"), (SENSORS, None),
    ]
    assert len(cases) >= 200
    for topic, payload in cases + unexpected:
        assert alarm.handle_message(topic, payload) is None, (topic, payload[:80] if payload else payload)
    assert snapshot(alarm, mock_pins) == before
    assert alarm.ignored == len(cases) + len(unexpected)
    assert "exceeds max_payload_bytes" in caplog.text and "not JSON" in caplog.text
    assert alarm.handle_message(SENSORS, sensors(1)) == IDC  # still working


# --- over a real broker ---

def alarm_states(probe) -> list[dict]:
    return [json.loads(p) for p in probe.received(f"{ALARM}/Sensors")]


def test_alarm_over_mqtt_reacts_acknowledges_and_publishes_its_state(mosquitto, make_alarm, mock_pins, make_config):
    alarm = make_alarm(mosquitto).start()
    probe = Probe(mosquitto, [f"{ALARM}/#"])
    assert alarm.connection.wait_connected(5)
    assert probe.wait_for(f"{ALARM}/Status", ONLINE.encode())
    with ResultPublisher(make_config(mosquitto, name="server.json")) as server:
        server.publish_result(1, 0.9, False)
        assert wait_until(lambda: levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": True},
                          REACTION_SECONDS)
        assert wait_until(lambda: [s["State"] for s in alarm_states(probe)][-1:] == [IDC], REACTION_SECONDS)

        probe.publish(COMMANDS, ACK)
        assert wait_until(lambda: levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": False},
                          REACTION_SECONDS)
        assert wait_until(lambda: alarm_states(probe)[-1]["Acknowledged"] is True, REACTION_SECONDS)

        server.publish_result(0, 0.1, False)
        assert wait_until(lambda: levels(alarm, mock_pins) == {"red": False, "blue": True, "buzzer": False},
                          REACTION_SECONDS)
        server.publish_result(1, 0.56, True)
        assert wait_until(lambda: alarm.state == REVIEW, REACTION_SECONDS)
        assert wait_until(lambda: alarm_states(probe)[-1]["State"] == REVIEW, REACTION_SECONDS)
    states = [s["State"] for s in alarm_states(probe)]
    assert states == [IDLE, IDC, IDC, NO_IDC, REVIEW]
    assert alarm_states(probe)[-1]["Origin"] == "EdgeServer"
    alarm.close()
    assert probe.wait_for(f"{ALARM}/Status", OFFLINE.encode())
    # The last state shown is retained for whoever looks later.
    late = Probe(mosquitto, [f"{ALARM}/Sensors"])
    assert late.wait_for(f"{ALARM}/Sensors") and json.loads(late.received(f"{ALARM}/Sensors")[0])["State"] == REVIEW
    late.close()
    probe.close()


def test_alarm_survives_malformed_messages_over_mqtt(mosquitto, make_alarm, mock_pins):
    alarm = make_alarm(mosquitto).start()
    assert alarm.connection.wait_connected(5)
    probe = Probe(mosquitto, [])
    probe.publish(SENSORS, sensors(0))
    assert wait_until(lambda: alarm.state == NO_IDC, REACTION_SECONDS)
    before = snapshot(alarm, mock_pins)
    cases = malformed_messages(alarm.settings.max_payload_bytes)
    for topic, payload in cases:
        probe.client.publish(topic, payload, qos=1)
    assert wait_until(lambda: alarm.ignored == len(cases), 10), (alarm.ignored, len(cases))
    assert snapshot(alarm, mock_pins) == before
    assert alarm.connected
    probe.publish(SENSORS, sensors(1))
    assert wait_until(lambda: levels(alarm, mock_pins)["red"], REACTION_SECONDS)
    probe.close()


def test_alarm_reconnects_by_itself_after_the_broker_restarts(mosquitto, make_alarm, mock_pins):
    alarm = make_alarm(mosquitto).start()
    assert alarm.connection.wait_connected(5)
    mosquitto.stop()
    assert wait_until(lambda: not alarm.connected, 5)
    mosquitto.start()
    assert alarm.connection.wait_connected(10)
    probe = Probe(mosquitto, [])
    probe.publish(SENSORS, sensors(1))
    assert wait_until(lambda: levels(alarm, mock_pins) == {"red": True, "blue": False, "buzzer": True},
                      REACTION_SECONDS)
    probe.close()


# --- the script, as a real process ---

def start_alarm_process(config, tmp_path, use_env=False):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(ROOT / "iot_alarm.py"), "--config", str(config.path)]
    if use_env:
        env["GPIOZERO_PIN_FACTORY"] = "mock"
    else:
        args.append("--mock")
    log_path = tmp_path / "iot_alarm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    return process, log_path


def test_alarm_process_reacts_and_its_last_will_says_offline_when_killed(mosquitto, make_config, tmp_path):
    config = make_config(mosquitto, Alarm={"topics": [SENSORS]})
    probe = Probe(mosquitto, [f"{ALARM}/#"])
    process, log_path = start_alarm_process(config, tmp_path)
    try:
        assert probe.wait_for(f"{ALARM}/Status", ONLINE.encode(), timeout=10), log_path.read_text()
        assert probe.wait_for(f"{ALARM}/Sensors")  # IDLE, published on connect
        probe.publish(SENSORS, sensors(1))
        assert wait_until(lambda: alarm_states(probe)[-1]["State"] == IDC, REACTION_SECONDS), log_path.read_text()
        assert wait_until(lambda: "pin GPIO17 (red LED) -> HIGH" in log_path.read_text(), REACTION_SECONDS)
        assert "pin GPIO22 (buzzer) -> HIGH" in log_path.read_text()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)
        # No goodbye was sent: the broker publishes the last will.
        assert probe.wait_for(f"{ALARM}/Status", OFFLINE.encode(), timeout=5)
    finally:
        process.kill()
        process.wait(timeout=5)
    late = Probe(mosquitto, [f"{ALARM}/Status"])
    assert late.wait_for(f"{ALARM}/Status", OFFLINE.encode())
    late.close()
    probe.close()


@pytest.mark.parametrize("signum, use_env", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_alarm_process_stops_cleanly_on_a_signal(mosquitto, make_config, tmp_path, signum, use_env):
    config = make_config(mosquitto)
    probe = Probe(mosquitto, [f"{ALARM}/Status"])
    process, log_path = start_alarm_process(config, tmp_path, use_env=use_env)
    try:
        assert probe.wait_for(f"{ALARM}/Status", ONLINE.encode(), timeout=10), log_path.read_text()
        process.send_signal(signum)
        assert process.wait(timeout=5) == 0, log_path.read_text()
    finally:
        process.kill()
        process.wait(timeout=5)
    assert probe.wait_for(f"{ALARM}/Status", OFFLINE.encode())
    assert "stopping" in log_path.read_text() and "Traceback" not in log_path.read_text()
    probe.close()


def test_alarm_script_help_and_a_clear_error_for_a_missing_config(tmp_path):
    script = str(ROOT / "iot_alarm.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "--mock" in shown.stdout and "--config" in shown.stdout
    missing = tmp_path / "missing.json"
    failed = subprocess.run([sys.executable, script, "--mock", "--config", str(missing)],
                            capture_output=True, text=True, timeout=30)
    assert failed.returncode == 2
    assert f"{missing} does not exist" in failed.stderr and "Traceback" not in failed.stderr
