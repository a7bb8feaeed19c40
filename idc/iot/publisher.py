"""The classifier's side of MQTT: `ResultPublisher`, used by the edge server and inception_test.py.

A bounded queue and a worker thread over one idc.iot.mqtt.DeviceConnection, so publishing a result
never blocks and never raises.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from idc.core.config import Config
from idc.iot.homeassistant import server_discovery
from idc.iot.mqtt import DEFAULT_RECONNECT_DELAY, DeviceConnection, encode, result_messages

log = logging.getLogger(__name__)


class ResultPublisher:
    """Publishes classification results for the edge server and inception_test.py.

    `publish_result()` only puts the messages on a bounded queue (size IoTJumpWay.queue_size); a
    worker thread sends them with QoS 1 while the broker is reachable. When the queue is full the
    message is dropped and counted. With IoTJumpWay.enabled false it does nothing.

    `device` is the publishing device's own name (default IoTJumpWay.Server; inception_test.py uses
    IoTJumpWay.Tester), so one program never speaks for another. `on_published(mid, channel)` is
    called (in paho's thread) when the broker has acknowledged a message, e.g. to print it.
    A result acknowledged more than IoTJumpWay.stale_after_seconds after it was made (queued
    through an outage) is counted as late.
    """

    def __init__(
        self,
        config: Config,
        device: str | None = None,
        reconnect_delay: tuple[int, int] = DEFAULT_RECONNECT_DELAY,
        on_published: Callable[[int, str], None] | None = None,
    ):
        self.mqtt = config.mqtt
        self.enabled = config.mqtt.enabled
        self.device = device or config.mqtt.Server
        self._on_published = on_published
        # (topic, payload, made at time.monotonic()) per message
        self._queue: queue.Queue[tuple[str, bytes, float]] = queue.Queue(maxsize=config.mqtt.queue_size)
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dropped = 0
        self._published = 0
        self._refused = 0
        self._late = 0
        # QoS 1 messages sent but not yet acknowledged: mid -> (topic, made). paho can report the PUBACK
        # before publish() has returned the message id, so ids acknowledged "early" are kept until claimed.
        self._unacked: dict[int, tuple[str, float]] = {}
        self._acked_early: dict[int, tuple[float, bool]] = {}
        announce = ()
        if config.mqtt.home_assistant:
            announce = server_discovery(config.mqtt, self.device)
        self.connection = DeviceConnection(
            config, self.device, on_published=self._acknowledged, reconnect_delay=reconnect_delay,
            announce=announce,
        ) if self.enabled else None

    def start(self) -> ResultPublisher:
        if self.connection is None or self._worker is not None:
            return self
        self._stopping.clear()
        self.connection.start()
        self._worker = threading.Thread(target=self._run, name=f"mqtt-results-{self.device}", daemon=True)
        self._worker.start()
        return self

    def __enter__(self) -> ResultPublisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def publish_result(self, results: int, confidence: float, needs_review: bool) -> bool:
        """Queue one result (Sensors, plus Warnings on IDC). Never blocks, never raises.

        Returns False when the result was not queued in full (disabled, invalid, or queue full).
        """
        if self.connection is None:
            return False
        try:
            messages = [(topic, encode(payload)) for topic, payload in
                        result_messages(self.mqtt, results, confidence, needs_review, self.device)]
        except Exception as err:  # never raise into the caller's request handling
            log.error("MQTT: result not published, it is invalid: %s", err)
            with self._lock:
                self._dropped += 1
            return False
        queued_all = True
        made = time.monotonic()
        for topic, payload in messages:
            try:
                self._queue.put_nowait((topic, payload, made))
            except queue.Full:
                queued_all = False
                with self._lock:
                    self._dropped += 1
                    dropped = self._dropped
                # Log the first drop and then every 100th, not one line per message.
                if dropped == 1 or dropped % 100 == 0:
                    log.warning("MQTT: outgoing queue full (%d), %d message(s) dropped so far",
                                self._queue.maxsize, dropped)
        return queued_all

    def status(self) -> dict:
        """Counters for /api/health: connected, dropped, published (acknowledged), refused (by the
        broker's ACL), late (results acknowledged after stale_after_seconds), queued, in_flight."""
        with self._lock:
            return {
                "enabled": self.enabled,
                "device": self.device,
                "connected": self.connection is not None and self.connection.connected,
                "dropped": self._dropped,
                "published": self._published,
                "refused": self._refused,
                "late": self._late,
                "queued": self._queue.qsize(),
                "in_flight": len(self._unacked),
            }

    def flush(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until every queued message is acknowledged; True if all were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                # unfinished_tasks also counts the message the worker holds between get() and task_done().
                if self._queue.unfinished_tasks == 0 and not self._unacked:
                    return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting at most `timeout` s while connected), then disconnect cleanly."""
        if self._worker is None:
            return
        if self.connection.connected and not self.flush(timeout):
            log.warning("MQTT: stopping with %s", self.status())
        self._stopping.set()
        self._worker.join(timeout=2.0)
        self._worker = None
        self.connection.stop()

    def _acknowledged(self, mid: int, refused: bool) -> None:
        with self._lock:
            sent = self._unacked.pop(mid, None)
            if sent is None:
                self._acked_early[mid] = (time.monotonic(), refused)
                return
        self._count(mid, *sent, time.monotonic(), refused)

    def _sent(self, mid: int, topic: str, made: float) -> None:
        with self._lock:
            early = self._acked_early.pop(mid, None)
            if early is None:
                self._unacked[mid] = (topic, made)
                return
        self._count(mid, topic, made, *early)

    def _count(self, mid: int, topic: str, made: float, acked: float, refused: bool) -> None:
        channel = topic.rsplit("/", 1)[-1]
        with self._lock:
            if refused:
                self._refused += 1
                return
            self._published += 1
            if channel == "Sensors" and acked - made > self.mqtt.stale_after_seconds:
                self._late += 1  # one per result: its Sensors message
        if self._on_published:
            try:
                self._on_published(mid, channel)
            except Exception:
                log.exception("MQTT: on_published handler failed")

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                topic, payload, made = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                # Hand messages to paho only while connected, and only a bounded number unacknowledged:
                # paho's own buffer is unbounded, the bounded queue is this one.
                while not self._stopping.is_set() and not (
                    self.connection.connected and len(self._unacked) < self._queue.maxsize
                ):
                    self.connection.wait_connected(0.2)
                    if self.connection.connected:
                        time.sleep(0.01)
                if self._stopping.is_set():
                    break
                info = self.connection.publish(topic, payload)
                self._sent(info.mid, topic, made)
            except Exception:
                log.exception("MQTT: publishing to %s failed", topic)
            finally:
                self._queue.task_done()
