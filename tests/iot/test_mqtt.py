"""idc.iot.mqtt: payload formats, and the real behaviour against a real mosquitto broker."""

import datetime
import json
import logging
import math
import shutil
import subprocess
import time

import numpy as np
import pytest

from idc.core.errors import ConfigError
from idc.iot.publisher import ResultPublisher
from idc.iot.mqtt import (
    OFFLINE,
    ONLINE,
    DeviceConnection,
    device_topic,
    result_messages,
    sensors_payload,
    warnings_payload,
)
from tests.mosquitto import TEST_USERS, Mosquitto, Probe, find_tool, wait_retained, wait_until

SERVER = "IDC/Devices/Lab/EdgeServer"


# --- payload formats (no broker) ---

def test_topics_follow_the_iot_jumpway_scheme(make_config):
    mqtt = make_config().mqtt
    assert device_topic(mqtt, "EdgeServer", "Sensors") == "IDC/Devices/Lab/EdgeServer/Sensors"
    assert device_topic(mqtt, "IoTAlarm", "Commands") == "IDC/Devices/Lab/IoTAlarm/Commands"
    with pytest.raises(ValueError, match="unknown channel"):
        device_topic(mqtt, "EdgeServer", "Results")


def test_sensors_payload_has_the_design_fields_and_extras():
    assert sensors_payload("EdgeServer", 1, 0.87654, False, time="T") == {
        "Sensor": "CCTV",
        "SensorID": "EdgeServer",
        "SensorValue": "IDC: 1 (Confidence: 0.8765)",
        "Results": 1,
        "Confidence": 0.87654,
        "NeedsReview": False,
        "Time": "T",
    }


def test_warnings_payload_has_the_design_fields_and_extras():
    assert warnings_payload("EdgeServer", 1, 0.6, True, time="T") == {
        "WarningType": "CCTV",
        "WarningOrigin": "EdgeServer",
        "WarningValue": "RECOGNISED",
        "WarningMessage": "IDC Detected",
        "Results": 1,
        "Confidence": 0.6,
        "NeedsReview": True,
        "Time": "T",
    }


def test_idc_result_gives_sensors_and_warnings_no_idc_only_sensors(make_config):
    mqtt = make_config().mqtt
    # numpy scalars, as the model returns them, must still give JSON-encodable payloads.
    idc = result_messages(mqtt, np.int64(1), np.float32(0.75), np.bool_(False))
    assert [topic for topic, _ in idc] == [f"{SERVER}/Sensors", f"{SERVER}/Warnings"]
    sensors = json.loads(json.dumps(idc[0][1]))
    assert sensors["Results"] == 1 and sensors["NeedsReview"] is False
    assert sensors["Confidence"] == pytest.approx(0.75)
    stamp = datetime.datetime.fromisoformat(sensors["Time"])
    assert abs(stamp - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(seconds=5)
    assert idc[0][1]["Time"] == idc[1][1]["Time"]

    no_idc = result_messages(mqtt, 0, 0.1, False)
    assert [topic for topic, _ in no_idc] == [f"{SERVER}/Sensors"]
    assert no_idc[0][1]["SensorValue"] == "IDC: 0 (Confidence: 0.1000)"


@pytest.mark.parametrize("results, confidence", [
    (2, 0.5), (-1, 0.5), (0.7, 0.5), (math.inf, 0.5), ("1", 0.5), (None, 0.5),
    (1, 1.5), (1, -0.1), (1, math.nan), (1, "high"), (1, None),
])
def test_invalid_results_are_rejected(results, confidence):
    with pytest.raises(ValueError):
        sensors_payload("EdgeServer", results, confidence, False)


def test_missing_tls_file_is_a_config_error(make_config):
    config = make_config(IoTJumpWay={"tls_ca": "no-such-ca.crt"})
    with pytest.raises(ConfigError, match="tls_ca"):
        DeviceConnection(config, "EdgeServer")


def test_disabled_publisher_does_nothing(make_config):
    publisher = ResultPublisher(make_config(IoTJumpWay={"enabled": False})).start()
    assert publisher.publish_result(1, 0.9, False) is False
    assert publisher.status() == {
        "enabled": False, "device": "EdgeServer", "connected": False, "dropped": 0, "published": 0,
        "refused": 0, "late": 0, "queued": 0, "in_flight": 0,
    }
    publisher.stop()


def test_invalid_result_is_counted_not_raised(make_config):
    publisher = ResultPublisher(make_config(IoTJumpWay={"enabled": True}))  # not started: nothing connects
    assert publisher.publish_result(7, 0.5, False) is False
    assert publisher.publish_result(object(), 0.5, False) is False
    assert publisher.publish_result(1, math.inf, False) is False
    assert publisher.publish_result(math.inf, 0.5, False) is False
    assert publisher.status()["dropped"] == 4


# --- against a real broker ---

def test_status_online_retained_then_offline_on_clean_stop(mosquitto, make_config):
    connection = DeviceConnection(make_config(mosquitto), "EdgeServer")
    connection.start()
    try:
        assert connection.wait_connected(5)
        # What the broker keeps for late subscribers (not what happens to arrive live).
        assert wait_retained(mosquitto, f"{SERVER}/Status", ONLINE.encode())
        late = Probe(mosquitto, [f"{SERVER}/Status"])
    finally:
        connection.stop()
    assert late.wait_for(f"{SERVER}/Status", OFFLINE.encode())
    late.close()
    assert wait_retained(mosquitto, f"{SERVER}/Status", OFFLINE.encode())


def test_publisher_delivers_results_with_qos1(mosquitto, make_config):
    probe = Probe(mosquitto, [f"{SERVER}/#"])
    with ResultPublisher(make_config(mosquitto)) as publisher:
        assert publisher.connection.wait_connected(5)
        assert publisher.publish_result(1, 0.9, False)
        assert publisher.publish_result(0, 0.5, True)
        assert wait_until(lambda: publisher.status()["published"] == 3, 5), publisher.status()
        assert publisher.status() == {
            "enabled": True, "device": "EdgeServer", "connected": True, "dropped": 0, "published": 3,
            "refused": 0, "late": 0, "queued": 0, "in_flight": 0,
        }
    sensors = [json.loads(p) for p in probe.received(f"{SERVER}/Sensors")]
    warnings = [json.loads(p) for p in probe.received(f"{SERVER}/Warnings")]
    assert [(s["Results"], s["NeedsReview"], s["SensorValue"]) for s in sensors] == [
        (1, False, "IDC: 1 (Confidence: 0.9000)"), (0, True, "IDC: 0 (Confidence: 0.5000)")]
    assert [(w["WarningValue"], w["WarningOrigin"], w["Confidence"]) for w in warnings] == [
        ("RECOGNISED", "EdgeServer", 0.9)]
    assert probe.wait_for(f"{SERVER}/Status", OFFLINE.encode())  # stop() said goodbye
    probe.close()


def test_publisher_never_blocks_with_broker_down_drops_when_full_and_delivers_later(
    mosquitto_persistent, make_config
):
    broker = mosquitto_persistent
    # A persistent session: the broker keeps its subscription and queues its messages across the restart.
    probe = Probe(broker, [f"{SERVER}/Sensors"], client_id="probe-persistent", clean_session=False, reconnect=True)
    assert wait_until(lambda: probe.client.is_connected(), 5)
    time.sleep(0.2)  # let the SUBSCRIBE land before the broker goes away
    publisher = ResultPublisher(make_config(broker, IoTJumpWay={"queue_size": 50})).start()
    try:
        assert publisher.connection.wait_connected(5)
        broker.stop()
        assert wait_until(lambda: not publisher.status()["connected"], 5)

        slowest, started = 0.0, time.monotonic()
        for i in range(2000):
            before = time.monotonic()
            publisher.publish_result(0, i / 2000, False)
            slowest = max(slowest, time.monotonic() - before)
        total = time.monotonic() - started
        assert total < 1.0 and slowest < 0.05, (total, slowest)

        status = publisher.status()
        assert status["connected"] is False
        assert status["queued"] == 50
        # The worker may hold one message while it waits for the broker; every other one is dropped.
        assert 2000 - 51 <= status["dropped"] <= 2000 - 50
        expected = 2000 - status["dropped"]

        broker.start()
        assert wait_until(lambda: publisher.status()["published"] == expected, 10), publisher.status()
        assert wait_until(lambda: len(probe.received(f"{SERVER}/Sensors")) >= expected, 10)
        confidences = [json.loads(p)["Confidence"] for p in probe.received(f"{SERVER}/Sensors")]
        # The oldest ones, in order (the one the worker holds may have been taken a little later).
        assert len(confidences) == expected
        assert confidences[:50] == [i / 2000 for i in range(50)]
        assert confidences == sorted(set(confidences))
        assert publisher.status()["queued"] == 0
    finally:
        publisher.stop()
        probe.close()


def test_broker_down_at_start_is_not_an_error(mosquitto, make_config):
    mosquitto.stop()
    connection = DeviceConnection(make_config(mosquitto), "EdgeServer")
    started = time.monotonic()
    connection.start()
    assert time.monotonic() - started < 0.5
    try:
        assert not connection.wait_connected(0.3)
        mosquitto.start()
        assert connection.wait_connected(5)
    finally:
        connection.stop()


def test_wrong_credentials_are_refused_with_a_clear_log_line(mosquitto_auth, make_config, caplog):
    caplog.set_level(logging.INFO, logger="idc")
    for username, password in [("edge", "wrong-password"), (None, None)]:
        caplog.clear()
        config = make_config(mosquitto_auth, IoTJumpWay={"username": username, "password": password})
        connection = DeviceConnection(config, "EdgeServer")
        connection.start()
        try:
            assert wait_until(lambda: "refused" in caplog.text, 5), caplog.text
            assert "check IoTJumpWay username and password" in caplog.text
            assert not connection.connected
        finally:
            connection.stop()


def test_right_credentials_work(mosquitto_auth, make_config):
    config = make_config(mosquitto_auth, IoTJumpWay={"username": "edge", "password": TEST_USERS["edge"]})
    probe = Probe(mosquitto_auth, [f"{SERVER}/#"], username="alarm", password=TEST_USERS["alarm"])
    with ResultPublisher(config) as publisher:
        assert publisher.connection.wait_connected(5)
        publisher.publish_result(1, 0.8, False)
        assert probe.wait_for(f"{SERVER}/Status", ONLINE.encode())
        assert probe.wait_for(f"{SERVER}/Warnings")
    probe.close()


def _make_certificates(folder, name):
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt", "-days", "1",
            "-subj", f"/CN={name} test CA")
    openssl("req", *ec, "-keyout", f"{name}-server.key", "-out", f"{name}-server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key",
            "-CAcreateserial", "-out", f"{name}-server.crt", "-days", "1", "-extfile", "san.cnf")
    return folder / f"{name}-ca.crt", folder / f"{name}-server.crt", folder / f"{name}-server.key"


def test_tls_with_the_right_ca_connects_and_a_foreign_ca_does_not(tmp_path, make_config):
    if shutil.which("openssl") is None or find_tool("mosquitto") is None:
        pytest.skip("the TLS test needs openssl and mosquitto installed")
    broker_tls = _make_certificates(tmp_path, "broker")
    _make_certificates(tmp_path, "foreign")
    broker = Mosquitto(tmp_path / "mosquitto-tls", tls=broker_tls)
    broker.start()
    try:
        # Relative paths are taken from the folder of confs.json (tmp_path here).
        good = DeviceConnection(make_config(broker, IoTJumpWay={"tls_ca": "broker-ca.crt"}), "EdgeServer")
        bad = DeviceConnection(make_config(broker, "bad.json", IoTJumpWay={"tls_ca": "foreign-ca.crt"}), "EdgeServer")
        good.start()
        bad.start()
        try:
            assert good.wait_connected(5)
            assert not bad.wait_connected(0.5)
        finally:
            good.stop()
            bad.stop()
    finally:
        broker.stop()
