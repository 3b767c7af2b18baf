"""The access-control example of docs/mqtt.md, enforced by a real Mosquitto: each bridge
writes and reads only its own topics (and its own Home Assistant discovery node), and a
therapist reaches the bridges of their clients."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from devicebridge.cli.service import push_envelope
from devicebridge.mqtt import MqttSettings, Topics
from tests.broker import Mosquitto
from tests.service.conftest import (
    BRIDGE,
    WAIT_S,
    Therapist,
    routine_text,
    running,
    service_rig,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"
OTHER_BRIDGE = "bridge-9"
THERAPIST = "therapist-dr-lee"
WATCHER = "watcher"  # reads everything, to see what the broker let through


def documented_acl() -> str:
    """The ACL blocks of the access-control section, as a user would copy them."""
    text = DOCS.read_text("utf-8")
    section = text.split("## Many bridges on one broker: access control", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.DOTALL)
    acl = "".join(block for block in blocks if "pattern " in block)
    assert "pattern readwrite devicebridge/v1/%u/#" in acl, "the docs' ACL example moved"
    assert "pattern write homeassistant/sensor/%u/#" in acl, "the docs' ACL example moved"
    return acl + f"\nuser {WATCHER}\ntopic read #\n"


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, acl=documented_acl())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_the_documented_acl_keeps_bridges_apart(
    acl_broker: Mosquitto, tmp_path: Path
) -> None:
    port = acl_broker.port
    ours = Topics(BRIDGE)
    our_discovery = f"homeassistant/sensor/{BRIDGE}/"
    marker = f"{Topics(OTHER_BRIDGE).base}/marker"
    seen: list[tuple[str, bytes]] = []
    therapist = Therapist()
    data_dir = tmp_path / "bridge"
    therapist.trust_on(data_dir)

    async def watch(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            seen.append((str(message.topic), payload if isinstance(payload, bytes) else b""))

    def saw(predicate_topic: str) -> bool:
        return any(topic.startswith(predicate_topic) for topic, _ in seen)

    async with (
        aiomqtt.Client("127.0.0.1", port, username=WATCHER) as observer,
        service_rig(data_dir, broker_port=port, home_assistant=True, mqtt_username=BRIDGE) as rig,
    ):
        await observer.subscribe("#", qos=1)
        async with running(watch(observer)):
            await rig.start()
            # Our bridge may write its own topics and its own discovery node.
            await rig.wait(lambda: saw(our_discovery) and saw(f"{ours.base}/devices/"))

            async with aiomqtt.Client("127.0.0.1", port, username=OTHER_BRIDGE) as other:
                await other.subscribe(f"{ours.base}/#", qos=1)
                await other.subscribe(marker, qos=1)
                # Another bridge writes into ours: a program, a discovery config, a fake
                # 'offline'. Then a marker on its own topic: the broker handles one
                # client's messages in order, so once the marker is through, everything
                # before it has been judged.
                forged = therapist.sign(routine_text("firming"))
                await other.publish(ours.program_push, forged, qos=1)
                await other.publish(f"{our_discovery}x_battery/config", b"{}", qos=1)
                await other.publish(ours.availability, b"offline", qos=1, retain=True)
                await other.publish(marker, b"first", qos=1)
                await rig.wait(lambda: (marker, b"first") in seen)

                # The therapist of this client may push to it and read its answer.
                ack = await push_envelope(
                    MqttSettings("127.0.0.1", port, username=THERAPIST),
                    BRIDGE,
                    therapist.sign(routine_text("firming")),
                    timeout_s=WAIT_S,
                )
                # Nothing of our bridge (state, telemetry, acks) reached the other bridge.
                await other.publish(marker, b"second", qos=1)
                leaked = []
                async for message in other.messages:
                    if str(message.topic) == marker and message.payload == b"second":
                        break
                    if str(message.topic) != marker:
                        leaked.append(str(message.topic))
            await rig.stop()

    assert ack is not None
    assert ack["status"] == "accepted", ack
    # Only the therapist's push reached our bridge.
    assert [a["status"] for a in rig.service.acks] == ["accepted"]
    assert (ours.program_push, forged) not in seen
    assert f"{our_discovery}x_battery/config" not in [topic for topic, _ in seen]
    assert (ours.availability, b"offline") not in seen[: seen.index((marker, b"first"))]
    assert leaked == []
