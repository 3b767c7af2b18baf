"""Home Assistant MQTT discovery for the bridge's devices (battery and connection state).

Discovery configurations are retained under
``homeassistant/sensor/<bridge_id>/<serial>_<object>/config`` (the bridge is the
discovery node, so a broker ACL can give each bridge its own subtree); the entities read the
device's retained ``devices/<serial>/state`` topic and use the bridge's ``availability``
topic (its last will), so they turn unavailable when the bridge goes away. Home Assistant
announces ``online`` on ``homeassistant/status`` when it restarts; the bridge publishes
the configurations again then (docs/mqtt.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from devicebridge.integrations.mqtt import AVAILABILITY_OFFLINE, AVAILABILITY_ONLINE, Topics

DISCOVERY_PREFIX: Final = "homeassistant"
HOME_ASSISTANT_STATUS_TOPIC: Final = f"{DISCOVERY_PREFIX}/status"
MANUFACTURER: Final = "devicebridge"


@dataclass(frozen=True, slots=True)
class DiscoveredEntity:
    """One device as Home Assistant sees it."""

    serial: str
    name: str
    kind: str
    model: str | None = None
    firmware: str | None = None


def _discovery_id(raw: str) -> str:
    """``raw`` with only the characters discovery allows in node and object ids."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)


def unique_id(topics: Topics, serial: str, object_id: str) -> str:
    return _discovery_id(f"{topics.bridge_id}_{serial}_{object_id}")


def discovery_topic(topics: Topics, serial: str, object_id: str) -> str:
    """``homeassistant/sensor/<bridge_id>/<serial>_<object>/config``."""
    node = _discovery_id(topics.bridge_id)
    return f"{DISCOVERY_PREFIX}/sensor/{node}/{_discovery_id(f'{serial}_{object_id}')}/config"


def discovery_messages(topics: Topics, entity: DiscoveredEntity) -> list[tuple[str, bytes]]:
    """The retained discovery configurations of one device: (topic, JSON payload)."""
    device: dict[str, Any] = {
        "identifiers": [f"devicebridge_{entity.serial}"],
        "name": entity.name,
        "manufacturer": MANUFACTURER,
        "model": entity.model or entity.kind,
        "via_device": f"devicebridge_{topics.bridge_id}",
    }
    if entity.firmware:
        device["sw_version"] = entity.firmware
    common: dict[str, Any] = {
        "state_topic": topics.device_state(entity.serial),
        "availability_topic": topics.availability,
        "payload_available": AVAILABILITY_ONLINE.decode(),
        "payload_not_available": AVAILABILITY_OFFLINE.decode(),
        "device": device,
    }
    battery = {
        **common,
        "name": "Battery",
        "unique_id": unique_id(topics, entity.serial, "battery"),
        "device_class": "battery",
        "state_class": "measurement",
        "unit_of_measurement": "%",
        "value_template": "{{ value_json.battery_percent }}",
    }
    connection = {
        **common,
        "name": "Connection",
        "unique_id": unique_id(topics, entity.serial, "connection"),
        "icon": "mdi:bluetooth-connect",
        "value_template": "{{ value_json.state }}",
    }
    return [
        (discovery_topic(topics, entity.serial, "battery"), _encode(battery)),
        (discovery_topic(topics, entity.serial, "connection"), _encode(connection)),
    ]


def _encode(config: dict[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
