"""Home Assistant MQTT discovery over a real mosquitto: the configs under the discovery prefix, and the
state and availability topics carrying what the configs promise (value templates rendered with Jinja,
as Home Assistant does)."""

import json
import re

import jinja2
import pytest

from idc.iot.alarm import Alarm
from idc.iot.publisher import ResultPublisher
from tests.mosquitto import Probe, wait_until

CONFIG_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config$")
REQUIRED = ("name", "unique_id", "state_topic", "availability_topic", "payload_available", "payload_not_available",
            "device")


def render(template: str, payload: bytes) -> str:
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload)).strip()


def retained(probe, topic):
    return [p for t, p, was_retained in list(probe.messages) if t == topic and was_retained]


@pytest.fixture
def devices(mosquitto, make_config, mock_pins):
    config = make_config(mosquitto, IoTJumpWay={"home_assistant": True})
    publisher = ResultPublisher(config).start()
    alarm = Alarm(config).start()
    assert publisher.connection.wait_connected(5) and alarm.connection.wait_connected(5)
    # Connected is not yet announced: the configs may still be on their way to the broker. A first probe
    # that has seen all five (live or retained) proves the broker has stored them.
    settle = Probe(mosquitto, ["homeassistant/#"])
    try:
        assert wait_until(lambda: len({t for t, _, _ in settle.messages}) == 5, 5), settle.messages
    finally:
        settle.close()
    yield config, publisher, alarm
    alarm.close()
    publisher.stop()


def test_discovery_configs_have_the_required_fields(mosquitto, devices):
    # A late subscriber, as Home Assistant after a restart: the configs are retained.
    probe = Probe(mosquitto, ["homeassistant/#"])
    try:
        assert wait_until(lambda: len(probe.messages) >= 5, 3), probe.messages
        configs = {}
        for topic, payload, was_retained in probe.messages:
            match = CONFIG_TOPIC.match(topic)
            assert match and was_retained, topic
            config = json.loads(payload)
            assert all(config.get(key) for key in REQUIRED), (topic, config)
            assert config["device"]["identifiers"] and config["device"]["name"]
            assert config["device"]["identifiers"] == [match.group(2)]  # node id = the device
            # Home Assistant 2025.10+: default_entity_id (domain.slug) in place of object_id, gone in 2026.4.
            assert "object_id" not in config and config["default_entity_id"] == \
                f"{match.group(1)}.{config['unique_id']}".lower(), config
            configs[topic] = config
        assert len({c["unique_id"] for c in configs.values()}) == len(configs) == 5
        assert {t.split("/")[1] + "/" + t.split("/")[3] for t in configs} == {
            "sensor/result", "sensor/confidence", "binary_sensor/needs_review", "sensor/state", "sensor/late_results"}
        assert {c["device"]["identifiers"][0] for c in configs.values()} == {"IDC_Lab_EdgeServer", "IDC_Lab_IoTAlarm"}
    finally:
        probe.close()


def test_state_and_availability_topics_carry_what_the_configs_promise(mosquitto, devices):
    config, publisher, alarm = devices
    probe = Probe(mosquitto, ["homeassistant/#", "IDC/Devices/#"])
    try:
        assert wait_until(lambda: len([m for m in probe.messages if m[0].startswith("homeassistant/")]) == 5, 3)
        configs = {t: json.loads(p) for t, p, _ in probe.messages if t.startswith("homeassistant/")}
        publisher.publish_result(1, 0.91, True)
        for topic, entity in configs.items():
            # Availability: the retained Status says the device is available.
            assert wait_until(lambda: retained(probe, entity["availability_topic"])
                              == [entity["payload_available"].encode()], 2), topic
            assert probe.wait_for(entity["state_topic"]), topic
            value = render(entity["value_template"], probe.received(entity["state_topic"])[-1])
            kind, object_id = topic.split("/")[1], topic.split("/")[3]
            expected = {"result": "IDC", "confidence": "0.91", "needs_review": "ON", "late_results": "0"}
            if object_id == "state":
                assert wait_until(lambda: render(entity["value_template"], probe.received(entity["state_topic"])[-1])
                                  == "REVIEW", 2), topic
            else:
                assert value == expected[object_id], (topic, value)
            if kind == "binary_sensor":
                assert value in (entity["payload_on"], entity["payload_off"])
        server_status = configs["homeassistant/sensor/IDC_Lab_EdgeServer/result/config"]["availability_topic"]
        publisher.stop()
        assert probe.wait_for(server_status, configs["homeassistant/sensor/IDC_Lab_EdgeServer/result/config"]
                              ["payload_not_available"].encode())
    finally:
        probe.close()


def test_no_discovery_unless_asked(mosquitto, make_config):
    probe = Probe(mosquitto, ["homeassistant/#"])
    with ResultPublisher(make_config(mosquitto)) as publisher:
        assert publisher.connection.wait_connected(5)
        publisher.publish_result(1, 0.9, False)
        assert publisher.flush(5)
    assert probe.messages == []
    probe.close()
