"""Home Assistant MQTT discovery (IoTJumpWay.home_assistant): the devices announce their entities.

Each entity is one retained config message on `{discovery_prefix}/{component}/{node_id}/{object_id}/config`
(Home Assistant's documented format), published by the device itself on every connect. The states come
from the topics the devices publish anyway (the server's Sensors results, the alarm's retained Sensors
state); availability from the device's retained Status topic, with its ONLINE / OFFLINE payloads
(IoTJumpWay.status_online / status_offline) declared in the config.
"""

from __future__ import annotations

import re

from idc.core.config import MQTTSettings
from idc.iot.mqtt import device_topic

MANUFACTURER = "IDC Classifier"


def node_id(mqtt: MQTTSettings, device: str) -> str:
    """Home Assistant's node id for a device: letters, digits, _ and - only (e.g. IDC_Lab_EdgeServer)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{mqtt.Location}_{mqtt.Zone}_{device}")


def _entities(mqtt: MQTTSettings, device: str, model: str, entities) -> list[tuple[str, dict]]:
    node = node_id(mqtt, device)
    common = {
        "availability_topic": device_topic(mqtt, device, "Status"),
        "payload_available": mqtt.status_online,
        "payload_not_available": mqtt.status_offline,
        "device": {"identifiers": [node], "name": f"{mqtt.Zone} {device}", "manufacturer": MANUFACTURER,
                   "model": model},
    }
    messages = []
    for component, object_id, name, state_channel, extra in entities:
        # default_entity_id (domain.slug) replaced object_id in Home Assistant 2025.10; object_id
        # stopped working in 2026.4.
        config = {"name": name, "unique_id": f"{node}_{object_id}",
                  "default_entity_id": f"{component}.{node}_{object_id}".lower(),
                  "state_topic": device_topic(mqtt, device, state_channel), **extra, **common}
        messages.append((f"{mqtt.discovery_prefix}/{component}/{node}/{object_id}/config", config))
    return messages


def server_discovery(mqtt: MQTTSettings, device: str) -> list[tuple[str, dict]]:
    """A classifier (edge server, inception_test.py): its last result, confidence and review flag."""
    return _entities(mqtt, device, "IDC edge classifier", [
        ("sensor", "result", "Last result", "Sensors",
         {"value_template": "{{ 'IDC' if value_json.Results == 1 else 'No IDC' }}", "icon": "mdi:microscope"}),
        ("sensor", "confidence", "P(IDC)", "Sensors",
         {"value_template": "{{ value_json.Confidence }}", "state_class": "measurement"}),
        ("binary_sensor", "needs_review", "Needs review", "Sensors",
         {"value_template": "{{ 'ON' if value_json.NeedsReview else 'OFF' }}", "payload_on": "ON",
          "payload_off": "OFF"}),
    ])


def alarm_discovery(mqtt: MQTTSettings, device: str) -> list[tuple[str, dict]]:
    """The Raspberry Pi alarm: the state it shows and how many results reached it late."""
    return _entities(mqtt, device, "IDC alarm (Raspberry Pi)", [
        ("sensor", "state", "Alarm state", "Sensors", {"value_template": "{{ value_json.State }}", "icon": "mdi:alarm-light"}),
        ("sensor", "late_results", "Late results", "Sensors",
         {"value_template": "{{ value_json.Late }}", "state_class": "total_increasing"}),
    ])
