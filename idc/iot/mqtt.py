"""MQTT wiring shared by the edge server, inception_test.py and the alarm (IoT JumpWay conventions).

Topics are `{Location}/Devices/{Zone}/{Device}/{Channel}` with the channels Status, Warnings,
Sensors and Commands. Status carries the plain strings IoTJumpWay.status_online ("ONLINE";
published, retained, on every connect, once the device's subscriptions are confirmed) and
status_offline ("OFFLINE"; the retained last will, and published on a clean shutdown); every other
payload is a JSON object. Everything goes out with QoS 1.

`DeviceConnection` is one device's session: credentials, TLS, last will, automatic reconnect with
backoff in paho's background thread. A broker that is down at start is not an error: the
connection keeps trying. Sessions are persistent (MQTT 5, a fixed client id per device, clean start
off, session expiry IoTJumpWay.session_expiry): QoS 1 messages for a device that is away are kept by
the broker and delivered, in order, when it comes back. The server and inception_test.py publish
through idc.iot.publisher.ResultPublisher, built on this.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import operator
import threading
from collections.abc import Callable, Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from idc.core.config import Config, MQTTSettings
from idc.core.errors import ConfigError

log = logging.getLogger(__name__)

CHANNELS = ("Status", "Warnings", "Sensors", "Commands")
ONLINE = "ONLINE"
OFFLINE = "OFFLINE"
QOS = 1
DEFAULT_RECONNECT_DELAY = (1, 30)  # seconds: first retry, cap of the doubling backoff
SESSION_TAKEN_OVER = 142  # MQTT 5 disconnect reason: another client connected with our client id


def device_topic(mqtt: MQTTSettings, device: str, channel: str) -> str:
    """The topic of one channel of one device, e.g. IDC/Devices/Lab/EdgeServer/Sensors."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: use one of {', '.join(CHANNELS)}")
    return f"{mqtt.Location}/Devices/{mqtt.Zone}/{device}/{channel}"


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _checked_result(results, confidence, needs_review) -> tuple[int, float, bool]:
    # index()/float() also accept the numpy scalars the model returns, which json cannot encode.
    try:
        results, confidence = operator.index(results), float(confidence)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"results must be the integer 0 or 1 and confidence a number, "
                         f"got {results!r:.40} and {confidence!r:.40}") from None
    if results not in (0, 1):
        raise ValueError(f"results must be 0 (no IDC) or 1 (IDC), got {results}")
    if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
        raise ValueError(f"confidence must be a probability in [0, 1], got {confidence}")
    return results, confidence, bool(needs_review)


def _result_fields(results: int, confidence: float, needs_review: bool, time: str | None) -> dict:
    return {
        "Results": results,
        "Confidence": confidence,
        "NeedsReview": needs_review,
        "Time": time or utc_timestamp(),
    }


def sensors_payload(
    sensor_id: str, results: int, confidence: float, needs_review: bool, time: str | None = None
) -> dict:
    """The Sensors payload sent for every result."""
    results, confidence, needs_review = _checked_result(results, confidence, needs_review)
    return {
        "Sensor": "CCTV",
        "SensorID": sensor_id,
        "SensorValue": f"IDC: {results} (Confidence: {confidence:.4f})",
        **_result_fields(results, confidence, needs_review, time),
    }


def warnings_payload(
    warning_origin: str, results: int, confidence: float, needs_review: bool, time: str | None = None
) -> dict:
    """The Warnings payload sent when IDC is detected."""
    results, confidence, needs_review = _checked_result(results, confidence, needs_review)
    return {
        "WarningType": "CCTV",
        "WarningOrigin": warning_origin,
        "WarningValue": "RECOGNISED",
        "WarningMessage": "IDC Detected",
        **_result_fields(results, confidence, needs_review, time),
    }


def result_messages(
    mqtt: MQTTSettings, results: int, confidence: float, needs_review: bool, device: str | None = None
) -> list[tuple[str, dict]]:
    """(topic, payload) pairs for one result: Sensors always, Warnings too when IDC was detected."""
    device = device or mqtt.Server
    now = utc_timestamp()
    messages = [(device_topic(mqtt, device, "Sensors"), sensors_payload(device, results, confidence, needs_review, now))]
    if messages[0][1]["Results"] == 1:
        messages.append(
            (device_topic(mqtt, device, "Warnings"), warnings_payload(device, results, confidence, needs_review, now))
        )
    return messages


def encode(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def client_id(mqtt: MQTTSettings, device: str) -> str:
    """The fixed client id of a device: the broker keeps its session under this id."""
    return f"{mqtt.Location}-{mqtt.Zone}-{device}"


def result_time(data: dict) -> datetime.datetime | None:
    """When a result was made: its `Time` (ISO 8601 with offset), or None when it has no usable Time."""
    stamp = data.get("Time")
    if not isinstance(stamp, str):
        return None
    try:
        then = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return then if then.tzinfo is not None else None


def result_age(data: dict) -> float | None:
    """Seconds since a result's `Time`, or None when it has no usable Time."""
    then = result_time(data)
    return None if then is None else (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


class DeviceConnection:
    """One device's MQTT session: Status ONLINE on connect, retained last will OFFLINE, reconnects by itself.

    `subscriptions` are topic filters (re)subscribed on every connect; `on_message(topic, payload)`
    receives their messages; `on_connected()` runs after each successful connect, once the
    subscriptions are confirmed (in paho's thread). `announce` is (topic, payload) pairs published
    retained on every connect (Home Assistant discovery).
    Callback errors are logged, never allowed to kill the network thread.
    """

    def __init__(
        self,
        config: Config,
        device: str,
        subscriptions: Iterable[str] = (),
        on_message: Callable[[str, bytes], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        on_published: Callable[[int, bool], None] | None = None,
        reconnect_delay: tuple[int, int] = DEFAULT_RECONNECT_DELAY,
        announce: Iterable[tuple[str, dict]] = (),
    ):
        self.mqtt = config.mqtt
        self.device = device
        self.subscriptions = list(subscriptions)
        self.announce = [(topic, encode(payload)) for topic, payload in announce]
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_published = on_published
        self._connected = threading.Event()
        self._status_mids: set[int] = set()  # our own Status messages, not reported to on_published
        self._subscribe_mid: int | None = None
        self._started = False
        self._unreachable_logged = False
        self._refused_logged = False
        self.client = self._make_client(config, reconnect_delay)

    def topic(self, channel: str) -> str:
        return device_topic(self.mqtt, self.device, channel)

    def _make_client(self, config: Config, reconnect_delay: tuple[int, int]) -> paho.Client:
        mqtt = self.mqtt
        # A fixed id, so the broker finds the device's session again after a restart or an outage
        # (each program has its own device name: two processes with one id would take turns).
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id(mqtt, self.device),
                             protocol=paho.MQTTv5)
        client.suppress_exceptions = True
        if log.isEnabledFor(logging.DEBUG):
            # paho's own log is protocol detail (and logs routine retries as errors): only when debugging.
            client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        if mqtt.username is not None:
            client.username_pw_set(mqtt.username, mqtt.password)
        if mqtt.tls_ca or mqtt.tls_cert:
            files = {key: getattr(mqtt, key) and str(config.resolve(getattr(mqtt, key)))
                     for key in ("tls_ca", "tls_cert", "tls_key")}
            try:
                client.tls_set(ca_certs=files["tls_ca"], certfile=files["tls_cert"], keyfile=files["tls_key"])
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"IoTJumpWay TLS files in {config.path} cannot be used ({err}): "
                    "check tls_ca, tls_cert and tls_key"
                ) from None
        client.will_set(self.topic("Status"), mqtt.status_offline, qos=QOS, retain=True)
        client.reconnect_delay_set(*reconnect_delay)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        return client

    @property
    def broker(self) -> str:
        return f"{self.mqtt.host}:{self.mqtt.port}"

    @property
    def connected(self) -> bool:
        """Connected and, when it has subscriptions, subscribed: ready to send and receive."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Connect in the background; never raises because the broker is down."""
        if self._started:
            return
        self._started = True
        log.info("MQTT: %s connecting to %s", self.device, self.broker)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.mqtt.session_expiry
        # clean_start False on every connect: the broker resumes the session it kept for this id.
        self.client.connect_async(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive,
                                  clean_start=False, properties=properties)
        self.client.loop_start()

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=QOS, retain=retain)

    def publish_json(self, channel: str, payload: dict, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.publish(self.topic(channel), encode(payload), retain=retain)

    def stop(self, timeout: float = 2.0) -> None:
        """Clean shutdown: Status OFFLINE (retained), disconnect, stop the network thread."""
        if not self._started:
            return
        self._started = False
        if self.connected:
            info = self.publish(self.topic("Status"), self.mqtt.status_offline, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as err:
                log.warning("MQTT: %s could not publish OFFLINE: %s", self.device, err)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        log.info("MQTT: %s disconnected from %s", self.device, self.broker)

    # paho callbacks (VERSION2 signatures), run in paho's network thread.

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            hint = ""
            if reason_code.value in (4, 5, 134, 135):  # bad credentials / not authorised (MQTT 3 and 5 codes)
                hint = ": check IoTJumpWay username and password in confs.json"
            log.error("MQTT: broker %s refused %s (%s)%s", self.broker, self.device, reason_code, hint)
            return
        self._unreachable_logged = False
        log.info("MQTT: %s connected to %s%s", self.device, self.broker,
                 " (session resumed)" if flags.session_present else "")
        if self.subscriptions:
            # Ready once the broker confirms the subscriptions, so nothing sent after is missed.
            self._subscribe_mid = client.subscribe([(f, QOS) for f in self.subscriptions])[1]
        else:
            self._ready()

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        for topic_filter, code in zip(self.subscriptions, reason_codes):
            if code.is_failure:
                log.error("MQTT: broker %s refused the subscription of %s to %r (%s)",
                          self.broker, self.device, topic_filter, code)
        self._ready()

    def _ready(self) -> None:
        # Runs in the network thread, so this PUBACK cannot be handled before the id is recorded.
        for topic, payload in self.announce:
            self._status_mids.add(self.client.publish(topic, payload, qos=QOS, retain=True).mid)
        self._status_mids.add(
            self.client.publish(self.topic("Status"), self.mqtt.status_online, qos=QOS, retain=True).mid)
        self._connected.set()
        if self._on_connected:
            try:
                self._on_connected()
            except Exception:
                log.exception("MQTT: on_connected handler of %s failed", self.device)

    def _handle_connect_fail(self, client, userdata) -> None:
        # Logged once per outage; paho retries with backoff on its own.
        level = logging.DEBUG if self._unreachable_logged else logging.WARNING
        self._unreachable_logged = True
        log.log(level, "MQTT: %s cannot reach broker %s (down, wrong address or TLS failure); "
                "retrying in the background", self.device, self.broker)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if reason_code.value == SESSION_TAKEN_OVER:
            log.error("MQTT: another client connected to %s with the client id %r of %s: two programs use the "
                      "device name %r (give each its own in confs.json)", self.broker, client_id(self.mqtt, self.device),
                      self.device, self.device)
        elif was_connected and self._started:
            log.warning("MQTT: %s lost the connection to %s (%s); reconnecting", self.device, self.broker, reason_code)

    def _handle_message(self, client, userdata, message) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(message.topic, message.payload)
        except Exception:
            log.exception("MQTT: message handler of %s failed on topic %r", self.device, message.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # MQTT 5 brokers answer a publish that their ACL denies with a failure reason code.
        refused = reason_code.is_failure
        if refused and not self._refused_logged:
            self._refused_logged = True
            log.error("MQTT: broker %s refused a message of %s (%s): check the broker's ACL for user %r",
                      self.broker, self.device, reason_code, self.mqtt.username)
        if mid in self._status_mids:
            self._status_mids.discard(mid)
        elif self._on_published:
            self._on_published(mid, refused)
