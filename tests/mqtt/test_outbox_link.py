"""The outbox and the MQTT link against a real Mosquitto over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devicebridge.errors import OutboxFullError
from devicebridge.integrations.mqtt import MqttLink, MqttSettings, Topics, message_properties
from devicebridge.storage.outbox import Outbox, OutgoingMessage
from simulators import VirtualClock
from tests.broker import Mosquitto

WAIT_S = 20.0  # a safety net against hangs; results never depend on it


class Subscriber:
    """A QoS 1 subscriber that reconnects by itself and keeps message ids it has seen."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.received: list[dict[str, object]] = []
        self.duplicates = 0
        self._seen: set[str] = set()
        self.subscribed = asyncio.Event()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        body = json.loads(message.payload)  # type: ignore[arg-type]
                        if body["message_id"] in self._seen:
                            self.duplicates += 1
                            continue
                        self._seen.add(body["message_id"])
                        self.received.append(body)
                        self._changed.set()
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)  # reconnect polling while the broker is down

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.received) < count:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running(coroutine: object) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coroutine)  # type: ignore[arg-type]
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def enqueue(outbox: Outbox, topics: Topics, start: int, count: int) -> None:
    for n in range(start, start + count):
        message_id = outbox.message_id(outbox.next_sequence())
        body = {"message_id": message_id, "n": n}
        outbox.append(topics.telemetry("SN1"), json.dumps(body).encode())


async def test_broker_outage_loses_nothing_and_keeps_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    clock = VirtualClock()
    topics = Topics("bridge-1")
    outbox = Outbox(tmp_path / "outbox.sqlite3", bridge_id="bridge-1")
    link = MqttLink(
        MqttSettings("127.0.0.1", mosquitto.port, reconnect_initial_s=1.0),
        topics,
        outbox,
        clock=clock,
        rng=random.Random(1),
    )
    subscriber = Subscriber(mosquitto.port, topics.telemetry("SN1"))
    async with running(subscriber.run()), running(link.run()):
        async with asyncio.timeout(WAIT_S):
            await subscriber.subscribed.wait()
            await link.wait_connected()
        enqueue(outbox, topics, 0, 50)
        link.notify()
        await subscriber.wait_for(50)

        mosquitto.stop()
        async with asyncio.timeout(WAIT_S):
            await link.wait_disconnected()
        enqueue(outbox, topics, 50, 100)  # produced while the broker is away
        link.notify()
        assert len(outbox) == 100

        mosquitto.start()
        async with asyncio.timeout(WAIT_S):
            await subscriber.subscribed.wait()
        # The link waits out its backoff on the virtual clock: drive it.
        async with asyncio.timeout(WAIT_S):
            while not link.connected:
                await clock.advance(1.0)
                await asyncio.sleep(0.01)
        await subscriber.wait_for(150)

    assert [m["n"] for m in subscriber.received] == list(range(150))
    assert subscriber.duplicates == 0
    assert len(outbox) == 0
    assert link.connections == 2


async def test_outbox_survives_a_restart_and_resumes(mosquitto: Mosquitto, tmp_path: Path) -> None:
    topics = Topics("bridge-2")
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path, bridge_id="bridge-2")
    enqueue(first, topics, 0, 30)
    first.close()  # the bridge stopped before it could publish anything

    outbox = Outbox(path, bridge_id="bridge-2")
    link = MqttLink(MqttSettings("127.0.0.1", mosquitto.port), topics, outbox, clock=VirtualClock())
    subscriber = Subscriber(mosquitto.port, topics.telemetry("SN1"))
    async with running(subscriber.run()):
        async with asyncio.timeout(WAIT_S):
            await subscriber.subscribed.wait()
        async with running(link.run()):
            await subscriber.wait_for(30)
    assert [m["n"] for m in subscriber.received] == list(range(30))
    assert [m["message_id"] for m in subscriber.received][:2] == ["bridge-2:1", "bridge-2:2"]


BRIDGE_PROCESS = """
import asyncio, sys
from pathlib import Path
from devicebridge.integrations.mqtt import MqttLink, MqttSettings, Topics
from devicebridge.storage.outbox import Outbox
from simulators import VirtualClock

async def main():
    link = MqttLink(MqttSettings("127.0.0.1", int(sys.argv[1]), keepalive_s=1), Topics("bridge-3"),
                    Outbox(Path(sys.argv[2]), bridge_id="bridge-3"), clock=VirtualClock())
    task = asyncio.create_task(link.run())
    await link.wait_connected()
    print("connected", flush=True)
    await task

asyncio.run(main())
"""


async def test_availability_is_retained_and_a_killed_bridge_goes_offline_by_its_will(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    import sys

    topics = Topics("bridge-3")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BRIDGE_PROCESS,
        str(mosquitto.port),
        str(tmp_path / "o.sqlite3"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(WAIT_S):
        assert await process.stdout.readline() == b"connected\n"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(topics.availability, qos=1)
        async with asyncio.timeout(WAIT_S):
            messages = aiter(client.messages)
            first = await anext(messages)
            assert (first.payload, first.retain) == (b"online", True)
            process.kill()  # no clean disconnect: the broker must publish the will
            await process.wait()
            will = await anext(messages)
        assert will.payload == b"offline"


async def test_a_clean_shutdown_publishes_offline_itself(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    topics = Topics("bridge-4")
    link = MqttLink(
        MqttSettings("127.0.0.1", mosquitto.port),
        topics,
        Outbox(tmp_path / "o.sqlite3", bridge_id="bridge-4"),
        clock=VirtualClock(),
    )
    async with running(link.run()):
        async with asyncio.timeout(WAIT_S):
            await link.wait_connected()
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe(topics.availability, qos=1)
        async with asyncio.timeout(WAIT_S):
            retained = await anext(aiter(client.messages))
    assert (retained.payload, retained.retain) == (b"offline", True)


def test_outbox_refuses_past_its_limit_instead_of_dropping(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", bridge_id="b", max_messages=3)
    for _ in range(3):
        outbox.append("t", b"x")
    with pytest.raises(OutboxFullError, match="3 messages waiting"):
        outbox.append("t", b"x")
    assert len(outbox) == 3


def test_bridge_ids_that_would_break_topics_are_refused() -> None:
    with pytest.raises(ValueError, match="without '/'"):
        Topics("a/b")


def test_pending_reads_the_same_from_memory_and_from_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small mirror limit, so that appends overflow it and the outbox falls back to SQLite,
    # then mirrors again once what waits fits.
    monkeypatch.setattr("devicebridge.storage.outbox.MIRROR_MAX_MESSAGES", 5)
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path, bridge_id="b")
    appended = [outbox.append(f"t/{i}", bytes([i]), retain=i % 2 == 0) for i in range(8)]

    def as_read_back() -> list[tuple[int, str, str, bytes, int, bool]]:
        fresh = Outbox(path, bridge_id="b")  # reads SQLite only
        try:
            return [astuple_of(m) for m in fresh.pending(100)]
        finally:
            fresh.close()

    assert [m.sequence for m in outbox.pending(100)] == appended
    for delivered in (2, 4, 7):
        outbox.delivered(appended[delivered])
        outbox.append("t/late", b"late")  # mirrored again once few enough wait
        assert [astuple_of(m) for m in outbox.pending(100)] == as_read_back()
        assert [astuple_of(m) for m in outbox.pending(2)] == as_read_back()[:2]
        assert len(outbox) == len(as_read_back())


def astuple_of(message: OutgoingMessage) -> tuple[int, str, str, bytes, int, bool]:
    return (
        message.sequence,
        message.message_id,
        message.topic,
        bytes(message.payload),
        message.qos,
        message.retain,
    )


@pytest.mark.parametrize("message_id", ["b:1", "bridge-7:123456789", "é" * 70])
def test_message_id_properties_pack_as_paho_does(message_id: str) -> None:
    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.UserProperty = [("message-id", message_id)]
    ours = message_properties(message_id, aiomqtt.ProtocolVersion.V5)
    assert ours is not None
    assert ours.pack() == reference.pack()  # type: ignore[no-untyped-call]
    assert message_properties(message_id, aiomqtt.ProtocolVersion.V311) is None
