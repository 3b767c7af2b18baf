"""The access-control recipe of docs/mqtt.md (broker settings and ACL file), enforced by a
real Mosquitto: each bridge writes and reads only its own topics (and its own Home
Assistant discovery node), no account takes a bridge's session, and a therapist pushes to
the bridges of their clients and reads their answers, never their pushes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicebridge.cli.service import push_envelope
from devicebridge.integrations.mqtt import MqttSettings, Topics
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
PASSWORDS = {user: f"secret-of-{user}" for user in (BRIDGE, OTHER_BRIDGE, THERAPIST, WATCHER)}


def documented_recipe() -> tuple[str, str]:
    """The broker settings and the ACL file of the access-control section, as a user
    would copy them (the test's own password and ACL files replace the documented paths)."""
    text = DOCS.read_text("utf-8")
    section = text.split("## Many bridges on one broker: access control", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.DOTALL)
    acl = "".join(block for block in blocks if "pattern " in block)
    assert "pattern readwrite devicebridge/v1/%u/#" in acl, "the docs' ACL example moved"
    assert "pattern write homeassistant/sensor/%u/#" in acl, "the docs' ACL example moved"
    (settings,) = [block for block in blocks if "acl_file" in block]
    for line in ("use_username_as_clientid true", "allow_anonymous false", "password_file"):
        assert line in settings, f"the docs' broker settings lost {line!r}"
    settings = "\n".join(
        line for line in settings.splitlines() if not line.startswith(("acl_file", "password_file"))
    )
    return settings, acl + f"\nuser {WATCHER}\ntopic read #\n"


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    settings, acl = documented_recipe()
    broker = Mosquitto(tmp_path, acl=acl, passwords=PASSWORDS, settings=settings)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def connect_as(port: int, user: str, **options: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=user, password=PASSWORDS[user], **options)


def account(port: int, user: str) -> MqttSettings:
    return MqttSettings("127.0.0.1", port, username=user, password=PASSWORDS[user])


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
        connect_as(port, WATCHER) as observer,
        service_rig(
            data_dir,
            broker_port=port,
            home_assistant=True,
            mqtt_username=BRIDGE,
            mqtt_password=PASSWORDS[BRIDGE],
        ) as rig,
    ):
        await observer.subscribe("#", qos=1)
        async with running(watch(observer)):
            await rig.start()
            # Our bridge may write its own topics and its own discovery node.
            await rig.wait(lambda: saw(our_discovery) and saw(f"{ours.base}/devices/"))

            async with connect_as(port, OTHER_BRIDGE) as other:
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
                    account(port, THERAPIST),
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


def resume(expiry_s: int = 3600) -> dict[str, Any]:
    """Connect options that resume (or open) a persistent MQTT 5 session."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = expiry_s
    return {
        "protocol": aiomqtt.ProtocolVersion.V5,
        "clean_start": False,
        "properties": properties,
    }


# Accounts that try to pass for the bridge: its default client id and its user name.
IMPOSTORS = [
    (THERAPIST, f"devicebridge-{BRIDGE}"),
    (THERAPIST, BRIDGE),
    (OTHER_BRIDGE, f"devicebridge-{BRIDGE}"),
    (OTHER_BRIDGE, BRIDGE),
]


async def received_until_retained(
    port: int, user: str, identifier: str, marker_topic: str, **options: Any
) -> list[str]:
    """Connect as ``user`` with ``identifier``; the topics received before the retained
    message of ``marker_topic`` (whatever a resumed session holds comes before it)."""
    topics: list[str] = []
    async with connect_as(port, user, identifier=identifier, **options) as impostor:
        await impostor.subscribe(marker_topic, qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in impostor.messages:
                if str(message.topic) == marker_topic:
                    break
                topics.append(str(message.topic))
    return topics


@contextlib.asynccontextmanager
async def bridge(data_dir: Path, port: int) -> AsyncIterator[Any]:
    async with service_rig(
        data_dir,
        broker_port=port,
        massagers=0,
        mqtt_username=BRIDGE,
        mqtt_password=PASSWORDS[BRIDGE],
    ) as rig:
        await rig.start()
        await rig.wait_broker_connected()
        yield rig
        await rig.stop()


async def test_no_account_takes_a_bridge_session_or_reads_its_pushes(
    acl_broker: Mosquitto, tmp_path: Path
) -> None:
    port = acl_broker.port
    ours = Topics(BRIDGE)
    their_marker = f"{Topics(OTHER_BRIDGE).base}/marker"
    therapist = Therapist()
    data_dir = tmp_path / "bridge"
    therapist.trust_on(data_dir)

    async with bridge(data_dir, port) as rig:
        # Other accounts connect with the bridge's client ids, asking for a clean start:
        # taking over its session would disconnect it and wipe its subscription.
        async with connect_as(port, OTHER_BRIDGE) as other:
            await other.publish(their_marker, b"marker", qos=1, retain=True)
        for user, identifier in IMPOSTORS:
            marker = ours.availability if user == THERAPIST else their_marker
            assert await received_until_retained(port, user, identifier, marker) == []

        # The therapist subscribes to everything of the bridge, pushes, and sees the
        # answer, the bridge's status and installed programs, but not the push itself.
        seen: list[str] = []
        envelope = therapist.sign(routine_text("firming"))
        nonce = json.loads(envelope)["metadata"]["nonce"]
        async with connect_as(port, THERAPIST) as reader:
            await reader.subscribe(f"{ours.base}/#", qos=1)
            await reader.subscribe(ours.program_push, qos=1)
            await reader.publish(ours.program_push, envelope, qos=1)
            async with asyncio.timeout(WAIT_S):
                async for message in reader.messages:
                    seen.append(str(message.topic))
                    body = message.payload
                    if str(message.topic) == ours.program_ack and isinstance(body, bytes):
                        ack = json.loads(body)
                        if ack.get("nonce") == nonce:
                            break
        assert ack["status"] == "accepted", ack
        assert ours.program_push not in seen
        assert {ours.availability, ours.status, ours.programs_installed} <= set(seen)
        assert rig.service.link is not None
        assert rig.service.link.connections == 1  # never disconnected by an impostor

    # The bridge is offline; its persistent session keeps its subscription. A push waits
    # there, and no other account gets it, whatever client id it connects with.
    queued = therapist.sign(routine_text("firming"))
    async with connect_as(port, THERAPIST) as pusher:
        await pusher.publish(ours.program_push, queued, qos=1)
    for user, identifier in IMPOSTORS:
        marker = ours.availability if user == THERAPIST else their_marker
        assert await received_until_retained(port, user, identifier, marker, **resume()) == []

    async with bridge(data_dir, port) as rig:
        await rig.wait(lambda: len(rig.service.acks) == 1)
        assert rig.service.acks[0]["nonce"] == json.loads(queued)["metadata"]["nonce"]
        assert rig.service.acks[0]["status"] == "accepted"
