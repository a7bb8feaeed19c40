"""The Raspberry Pi alarm: MQTT results in, red LED / blue LED / buzzer out (gpiozero).

IDC → red on, blue off, buzzer on for Alarm.buzzer_seconds. No IDC → blue on, red and buzzer off.
Needs review (it wins over the 0/1 result: the classifier is unsure) → red blinking, blue and
buzzer off. `{"Command": "ACK"}` on the alarm's own Commands channel, or the optional button,
silences the buzzer. The last result decides what is shown.

The session is persistent (idc.iot.mqtt): results published while the alarm is away are delivered,
in order, when it reconnects. A result older than IoTJumpWay.stale_after_seconds on arrival (by its
`Time`) is late: shown, and published with "Stale": true, but the buzzer stays silent (a beep for a
result hours old would send someone to the wrong patient); late results are counted ("Late").
A result older (by its `Time`) than one already shown from the same device is ignored: a broker
restored from an older saved state after a crash redelivers results already shown. The newest
shown is kept in Alarm.state_file, so this holds across a restart of the alarm too.

Every message is checked before any pin moves: wrong topic, oversized, not JSON, not an object,
wrong types or missing fields → logged and ignored. Extra unknown fields in an otherwise valid
payload are accepted (the payload formats allow extra fields). The state shown is published,
retained, on the alarm's Sensors channel: `{"Sensor": "Alarm", "State": "IDC"|"NO_IDC"|"REVIEW"|"IDLE", ...}`.
The log has one line per state change (the blinking of the review state is not logged pin by pin).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
import threading

import paho.mqtt.client as paho
from gpiozero import LED, Button, Buzzer
from gpiozero.pins.mock import MockFactory, MockPin

from idc.core.config import Config
from idc.core.errors import IgnoredMessage
from idc.core.files import write_text_atomically
from idc.iot.homeassistant import alarm_discovery
from idc.iot.mqtt import (DEFAULT_RECONNECT_DELAY, DeviceConnection, device_topic, result_age, result_time,
                          utc_timestamp)

log = logging.getLogger(__name__)

IDLE, NO_IDC, IDC, REVIEW = "IDLE", "NO_IDC", "IDC", "REVIEW"
REVIEW_BLINK_SECONDS = 0.25
_SENSOR_VALUE = re.compile(r"IDC: ([01])\b")


class LoggingMockPin(MockPin):
    """A gpiozero mock pin that logs every level change, so a run without a Pi shows what the pins do.

    While `quiet` (the red LED blinking for review: 4 changes a second) changes are not logged; the
    alarm logs the state once instead."""

    label = ""
    quiet = False

    def _change_state(self, value):
        changed = super()._change_state(value)
        if changed and not self.quiet:
            log.info("pin %s%s -> %s", self.info.name, f" ({self.label})" if self.label else "",
                     "HIGH" if value else "LOW")
        return changed


def mock_pin_factory() -> MockFactory:
    """gpiozero's mock pin factory with pins that log their changes (no Raspberry Pi needed)."""
    return MockFactory(pin_class=LoggingMockPin)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_result_extras(data: dict) -> bool:
    """Validate the optional result fields; returns NeedsReview."""
    needs_review = data.get("NeedsReview", False)
    if not isinstance(needs_review, bool):
        raise IgnoredMessage(f"NeedsReview must be true or false, got {needs_review!r:.50}")
    if "Confidence" in data:
        confidence = data["Confidence"]
        if not (_is_number(confidence) and math.isfinite(confidence) and 0 <= confidence <= 1):
            raise IgnoredMessage(f"Confidence must be a number in [0, 1], got {confidence!r:.50}")
    return needs_review


def _results_field(data: dict) -> int | None:
    if "Results" not in data:
        return None
    results = data["Results"]
    if type(results) is not int or results not in (0, 1):
        raise IgnoredMessage(f"Results must be 0 or 1, got {results!r:.50}")
    return results


def parse_sensors(data: dict) -> str:
    """The state a Sensors payload asks for (the 2018 format with only SensorValue is understood too)."""
    if data.get("Sensor") != "CCTV":
        raise IgnoredMessage("not a CCTV (classifier) reading")
    results = _results_field(data)
    if "SensorValue" in data:
        value = data["SensorValue"]
        match = _SENSOR_VALUE.match(value) if isinstance(value, str) else None
        if match is None:
            raise IgnoredMessage(f"SensorValue must read 'IDC: <0|1> ...', got {value!r:.50}")
        if results is not None and int(match.group(1)) != results:
            raise IgnoredMessage("Results and SensorValue disagree")
        results = int(match.group(1))
    if results is None:
        raise IgnoredMessage("no Results or SensorValue field")
    needs_review = _check_result_extras(data)
    return REVIEW if needs_review else (IDC if results == 1 else NO_IDC)


def parse_warnings(data: dict) -> str:
    """The state a Warnings payload asks for (IDC, or REVIEW when flagged)."""
    if data.get("WarningType") != "CCTV" or data.get("WarningValue") != "RECOGNISED":
        raise IgnoredMessage("not a CCTV RECOGNISED warning")
    if _results_field(data) == 0:
        raise IgnoredMessage("a warning with Results 0")
    return REVIEW if _check_result_extras(data) else IDC


class Alarm:
    """Drives the LEDs and buzzer from MQTT messages.

    Pass gpiozero devices (red, blue, buzzer, optional button) or let it make them from the
    configured pins with `pin_factory` (None = gpiozero's default). `handle_message()` is the
    single entry for messages, from MQTT or directly from tests. `start()` connects to the broker.
    """

    def __init__(
        self,
        config: Config,
        red: LED | None = None,
        blue: LED | None = None,
        buzzer: Buzzer | None = None,
        button: Button | None = None,
        pin_factory=None,
        reconnect_delay: tuple[int, int] = DEFAULT_RECONNECT_DELAY,
    ):
        self.config = config
        self.settings = config.Alarm
        mqtt = config.mqtt
        self.device = mqtt.Alarm
        self.commands_topic = device_topic(mqtt, self.device, "Commands")
        self.state_topic = device_topic(mqtt, self.device, "Sensors")
        self._own_prefix = device_topic(mqtt, self.device, "Status").rsplit("/", 1)[0] + "/"
        # Before the pins: a bad TLS setting raises here without leaving pins reserved.
        self.connection = DeviceConnection(
            config, self.device,
            subscriptions=[*self.settings.topics, self.commands_topic],
            on_message=self.handle_message,
            on_connected=self._publish_state,
            reconnect_delay=reconnect_delay,
            announce=alarm_discovery(mqtt, self.device) if mqtt.home_assistant else (),
        )
        self.red = red or LED(self.settings.red_led_pin, pin_factory=pin_factory)
        self.blue = blue or LED(self.settings.blue_led_pin, pin_factory=pin_factory)
        self.buzzer = buzzer or Buzzer(self.settings.buzzer_pin, pin_factory=pin_factory)
        if button is None and self.settings.button_pin is not None:
            button = Button(self.settings.button_pin, pin_factory=pin_factory)
        self.button = button
        if self.button is not None:
            self.button.when_pressed = self.acknowledge
        for label, device in self._devices().items():
            if isinstance(device.pin, LoggingMockPin):
                device.pin.label = label
        self._lock = threading.RLock()
        self.state = IDLE
        self.origin: str | None = None
        self.acknowledged = False
        self.stale = False
        self.late = 0  # results that arrived older than IoTJumpWay.stale_after_seconds
        self.ignored = 0
        self.handled = 0
        self.closed = False
        self._last_result: tuple | None = None  # (origin, Time, state) of the last result shown
        # origin -> the Time of the newest result shown from it; kept in Alarm.state_file, so that a
        # restarted alarm knows what it showed before.
        self.state_file = config.resolve(self.settings.state_file) if self.settings.state_file else None
        self._newest_shown: dict[str, datetime.datetime] = self._read_state_file()
        log.info("Alarm %s: red LED %s, blue LED %s, buzzer %s%s; watching %s", self.device,
                 self.red.pin, self.blue.pin, self.buzzer.pin,
                 f", button {self.button.pin}" if self.button else "", ", ".join(self.settings.topics))

    def _read_state_file(self) -> dict:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            shown = {str(origin): result_time({"Time": stamp})
                     for origin, stamp in json.loads(self.state_file.read_text())["newest_shown"].items()}
            return {origin: made for origin, made in shown.items() if made is not None}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("Alarm: %s is unreadable (%s): starting without the results shown before",
                        self.state_file, type(err).__name__)
            return {}

    def _write_state_file(self) -> None:
        if self.state_file is None:
            return
        text = json.dumps({"newest_shown": {o: t.isoformat(timespec="milliseconds") for o, t in self._newest_shown.items()}})
        try:
            write_text_atomically(self.state_file, text)
        except OSError as err:
            log.error("Alarm: cannot write %s (%s): a restarted alarm may show a replayed result again",
                      self.state_file, err.strerror or err)

    def _devices(self) -> dict:
        devices = {"red LED": self.red, "blue LED": self.blue, "buzzer": self.buzzer}
        if self.button is not None:
            devices["button"] = self.button
        return devices

    @property
    def connected(self) -> bool:
        return self.connection.connected

    def start(self) -> Alarm:
        """Connect to the broker in the background (it need not be up yet)."""
        self.connection.start()
        return self

    def close(self) -> None:
        """Publish OFFLINE, disconnect, turn everything off and release the pins (once)."""
        if self.closed:
            return
        self.closed = True
        self.connection.stop()
        with self._lock:
            for device in self._devices().values():
                if hasattr(device, "off"):
                    device.off()
                device.close()

    def handle_message(self, topic: str, payload: bytes) -> str | None:
        """Act on one message; returns the state shown after it, or None when it was ignored."""
        try:
            command_or_state, data = self._parse(topic, payload)
        except IgnoredMessage as why:
            self.ignored += 1
            log.warning("Alarm: ignored message on %.120r: %s", topic, why)
            return None
        self.handled += 1
        if command_or_state == "ACK":
            self.acknowledge()
            return self.state
        origin = topic.split("/")[3]
        # A server sends Sensors and, on IDC, a Warnings copy of the same result (same Time):
        # an alarm watching both channels must not sound twice, nor re-sound after an ACK.
        result = (origin, data["Time"], command_or_state) if isinstance(data.get("Time"), str) else None
        made = result_time(data)
        age = result_age(data)
        stale = age is not None and age > self.config.mqtt.stale_after_seconds
        with self._lock:
            if result is not None and result == self._last_result:
                log.debug("Alarm: %s is the same result as before, already shown", topic)
                return self.state
            newest = self._newest_shown.get(origin)
            if made is not None and newest is not None and made < newest:
                # A broker restored from an older saved state (after a crash) redelivers results
                # already shown: never show, nor sound, a result older than one already shown.
                log.warning("Alarm: a result from %s made %s is older than the one already shown (%s): ignored",
                            origin, data["Time"], newest.isoformat())
                return self.state
            if made is not None and age > -self.config.mqtt.stale_after_seconds:
                # Not a Time far ahead of this clock (a server's clock set wrong once): remembered, it
                # would hide every later result until then.
                self._newest_shown[origin] = made
                self._write_state_file()
            self._last_result = result
            if stale:
                self.late += 1
                log.warning("Alarm: a result from %s arrived %.0f s late (made %s): shown without the buzzer",
                            origin, age, data["Time"])
            self.show(command_or_state, origin=origin, stale=stale)
        return self.state

    def _parse(self, topic, payload) -> tuple[str, dict]:
        if not isinstance(topic, str) or not isinstance(payload, (bytes, bytearray)):
            raise IgnoredMessage("topic must be text and payload bytes")
        if len(payload) > self.settings.max_payload_bytes:
            raise IgnoredMessage(f"payload of {len(payload)} bytes exceeds max_payload_bytes "
                                 f"({self.settings.max_payload_bytes})")
        is_command = topic == self.commands_topic
        if not is_command:
            if topic.startswith(self._own_prefix):
                raise IgnoredMessage("the alarm's own message")
            if not any(paho.topic_matches_sub(f, topic) for f in self.settings.topics):
                raise IgnoredMessage("topic not in Alarm.topics")
        levels = topic.split("/")
        if not is_command and (len(levels) != 5 or levels[1] != "Devices" or levels[4] not in ("Sensors", "Warnings")):
            raise IgnoredMessage("not a {Location}/Devices/{Zone}/{Device}/Sensors|Warnings topic")
        try:
            data = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise IgnoredMessage(f"not JSON ({type(err).__name__})") from None
        if not isinstance(data, dict):
            raise IgnoredMessage(f"JSON {type(data).__name__}, not an object")
        if is_command:
            if data.get("Command") != "ACK":
                raise IgnoredMessage(f"unknown command {data.get('Command')!r:.50}")
            return "ACK", data
        return (parse_sensors(data) if levels[4] == "Sensors" else parse_warnings(data)), data

    def show(self, state: str, origin: str | None = None, stale: bool = False) -> None:
        """Set the pins for a state (IDC, NO_IDC, REVIEW or IDLE) and publish it; a stale IDC
        (a late result) lights the red LED without the buzzer."""
        if state not in (IDC, NO_IDC, REVIEW, IDLE):
            raise ValueError(f"unknown alarm state {state!r}")
        with self._lock:
            if self.state == REVIEW and state != REVIEW:
                self.red.off()  # stops the blinking (not logged) before the pins log again
            # The state first: whoever sees the new pins (a test, a status request) sees the new state too.
            self.state, self.origin, self.acknowledged, self.stale = state, origin, False, stale
            self._quiet_red(False)
            # Whatever goes off goes off first, so two signals never show at once.
            if state == IDC:
                self.blue.off()
                self.red.on()
                if self.settings.buzzer_seconds > 0 and not stale:
                    # One beep of buzzer_seconds; gpiozero's own thread turns it off again.
                    self.buzzer.blink(on_time=self.settings.buzzer_seconds, off_time=0, n=1)
                else:
                    self.buzzer.off()
            elif state == NO_IDC:
                self.red.off()
                self.buzzer.off()
                self.blue.on()
            elif state == REVIEW:
                self.blue.off()
                self.buzzer.off()
                self._quiet_red(True)
                self.red.blink(on_time=REVIEW_BLINK_SECONDS, off_time=REVIEW_BLINK_SECONDS)
            else:  # IDLE
                for device in (self.red, self.blue, self.buzzer):
                    device.off()
            log.info("Alarm: %s%s%s%s", state, f" (from {origin})" if origin else "",
                     ", late: no buzzer" if stale and state == IDC else " (late)" if stale else "",
                     f", red LED blinking every {REVIEW_BLINK_SECONDS} s" if state == REVIEW else "")
            self._publish_state()

    def _quiet_red(self, quiet: bool) -> None:
        if isinstance(self.red.pin, LoggingMockPin):
            self.red.pin.quiet = quiet

    def acknowledge(self) -> None:
        """Silence the buzzer; the LEDs keep showing the result."""
        with self._lock:
            self.buzzer.off()
            self.acknowledged = True
            log.info("Alarm: acknowledged, buzzer silenced")
            self._publish_state()

    def _publish_state(self) -> None:
        if not self.connection.connected:
            return  # published again on (re)connect
        with self._lock:
            payload = {"Sensor": "Alarm", "State": self.state, "Origin": self.origin,
                       "Acknowledged": self.acknowledged, "Stale": self.stale, "Late": self.late,
                       "Time": utc_timestamp()}
            self.connection.publish_json("Sensors", payload, retain=True)
