"""The example topic ACL (examples/mosquitto/idc.acl) on a real mosquitto: no device speaks for another,
and the normal flow (results, alarm state, discovery, the operator's ACK) still works end to end."""

import json

import pytest

from idc.iot.alarm import IDC, Alarm
from idc.iot.mqtt import DeviceConnection, encode, sensors_payload
from idc.iot.publisher import ResultPublisher
from tests.broker import started_broker
from tests.mosquitto import EXAMPLE_ACL, TEST_USERS, Probe, wait_until

SERVER, ALARM = "IDC/Devices/Lab/EdgeServer", "IDC/Devices/Lab/IoTAlarm"
REACTION_SECONDS = 2.0


@pytest.fixture
def broker(tmp_path):
    broker = started_broker(tmp_path / "mosquitto-acl", users=TEST_USERS, acl_file=EXAMPLE_ACL)
    yield broker
    broker.stop()


@pytest.fixture
def configs(broker, make_config):
    def as_user(user, **sections):
        mqtt = {"username": user, "password": TEST_USERS[user], "home_assistant": True}
        return make_config(broker, name=f"{user}.json", IoTJumpWay=mqtt, **sections)
    return {"edge": as_user("edge"), "alarm": as_user("alarm", Alarm={"buzzer_seconds": 30.0})}


@pytest.fixture
def operator(broker):
    probe = Probe(broker, ["IDC/Devices/#"], username="operator", password=TEST_USERS["operator"])
    yield probe
    probe.close()


def pins(alarm, factory):
    s = alarm.settings
    return {n: factory.pin(p).state for n, p in (("red", s.red_led_pin), ("buzzer", s.buzzer_pin))}


def test_the_normal_flow_works_under_the_acl(broker, configs, operator, mock_pins):
    alarm = Alarm(configs["alarm"]).start()
    try:
        with ResultPublisher(configs["edge"]) as server:
            assert server.connection.wait_connected(5) and alarm.connection.wait_connected(5)
            server.publish_result(1, 0.9, False)
            assert wait_until(lambda: pins(alarm, mock_pins) == {"red": True, "buzzer": True}, REACTION_SECONDS)
            assert server.flush(5) and server.status()["refused"] == 0  # discovery configs allowed too
            assert operator.wait_for(f"{ALARM}/Sensors") and operator.wait_for(f"{SERVER}/Status", b"ONLINE")
            operator.publish(f"{ALARM}/Commands", encode({"Command": "ACK"}))  # the operator may command
            assert wait_until(lambda: pins(alarm, mock_pins) == {"red": True, "buzzer": False}, REACTION_SECONDS)
        assert "denied" not in broker.log().lower(), broker.log()[-2000:]
    finally:
        alarm.close()


def test_the_alarms_credentials_cannot_publish_as_the_server(broker, configs, operator, mock_pins):
    alarm = Alarm(configs["alarm"]).start()
    # Someone with the Pi's password, posing as the server with a valid "IDC Detected" result.
    impostor = DeviceConnection(configs["alarm"], "Impostor")
    impostor.start()
    try:
        assert alarm.connection.wait_connected(5) and impostor.wait_connected(5)
        fake = encode(sensors_payload("EdgeServer", 1, 0.99, False))
        info = impostor.publish(f"{SERVER}/Sensors", fake)
        info.wait_for_publish(3)
        impostor.publish(f"{SERVER}/Status", "OFFLINE").wait_for_publish(3)
        # A message sent after the fake ones arrives: so the fake ones would have arrived before it.
        operator.publish(f"{SERVER}/Commands", b"{}")
        assert operator.wait_for(f"{SERVER}/Commands")
        assert operator.received(f"{SERVER}/Sensors") == [] and operator.received(f"{SERVER}/Status") == []
        assert alarm.state != IDC and alarm.handled == 0 and pins(alarm, mock_pins) == {"red": False, "buzzer": False}
    finally:
        impostor.stop()
        alarm.close()


def test_the_servers_credentials_cannot_command_the_alarm(broker, configs, operator, mock_pins):
    alarm = Alarm(configs["alarm"]).start()
    server = DeviceConnection(configs["edge"], "EdgeServer")
    server.start()
    try:
        assert alarm.connection.wait_connected(5) and server.wait_connected(5)
        alarm.show(IDC)  # sounding
        server.publish(f"{ALARM}/Commands", encode({"Command": "ACK"})).wait_for_publish(3)
        server.publish(f"{ALARM}/Sensors", json.dumps({"Sensor": "Alarm", "State": "IDLE"})).wait_for_publish(3)
        operator.publish(f"{SERVER}/Commands", b"{}")
        assert operator.wait_for(f"{SERVER}/Commands")
        assert operator.received(f"{ALARM}/Commands") == []
        assert all(json.loads(p)["State"] == IDC for p in operator.received(f"{ALARM}/Sensors")[1:])
        assert not alarm.acknowledged and pins(alarm, mock_pins) == {"red": True, "buzzer": True}
    finally:
        server.stop()
        alarm.close()


def test_the_example_acl_grants_each_device_only_its_own_topics():
    text = EXAMPLE_ACL.read_text()
    users = {}
    for line in map(str.strip, text.splitlines()):
        if line.startswith("user "):
            current = users.setdefault(line.split()[1], [])
        elif line.startswith("topic "):
            current.append(tuple(line.split()[1:]))
    assert set(users) == {"edge", "alarm", "operator", "homeassistant"}
    for access, topic in users["edge"]:
        assert access == "write" and ("/EdgeServer/" in topic or "/InceptionTest/" in topic
                                      or "_EdgeServer/" in topic or "_InceptionTest/" in topic), topic
    assert all("IoTAlarm" in topic for access, topic in users["alarm"] if access != "read")
