"""Several publishes in flight at QoS 1: order, acknowledgement and deletion, also when the
broker restarts while they are in flight (a real Mosquitto that keeps its sessions)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiomqtt

from devicebridge.integrations.mqtt import OUTBOX_IN_FLIGHT, MqttLink, MqttSettings, Topics
from devicebridge.storage.outbox import Outbox
from simulators import VirtualClock
from tests.broker import Mosquitto
from tests.mqtt.test_outbox_link import WAIT_S, Subscriber, enqueue, running

SUBSCRIBER_ID = "in-flight-subscriber"


class PersistentSubscriber:
    """A subscriber with a session the broker keeps (and saves) across its restart, so
    that every message the broker acknowledged reaches it; records ids in arrival order."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.arrivals: list[int] = []
        self.subscribed = asyncio.Event()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=SUBSCRIBER_ID,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        body = json.loads(message.payload)  # type: ignore[arg-type]
                        self.arrivals.append(int(body["n"]))
                        self._changed.set()
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)  # reconnect polling while the broker is down

    def unique(self) -> list[int]:
        """Each message once, in the order it first arrived."""
        seen: set[int] = set()
        first = []
        for n in self.arrivals:
            if n not in seen:
                seen.add(n)
                first.append(n)
        return first

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(set(self.arrivals)) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_several_publishes_in_flight_keep_order_and_empty_the_outbox(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    topics = Topics("bridge-4")
    outbox = Outbox(tmp_path / "outbox.sqlite3", bridge_id="bridge-4")
    link = MqttLink(MqttSettings("127.0.0.1", mosquitto.port), topics, outbox, clock=VirtualClock())
    subscriber = Subscriber(mosquitto.port, topics.telemetry("SN1"))
    async with running(subscriber.run()), running(link.run()):
        async with asyncio.timeout(WAIT_S):
            await subscriber.subscribed.wait()
            await link.wait_connected()
        enqueue(outbox, topics, 0, 3 * OUTBOX_IN_FLIGHT)
        link.notify()
        await asyncio.sleep(0)  # the pump hands what it can to the client
        enqueue(outbox, topics, 3 * OUTBOX_IN_FLIGHT, 50)  # while the first are in flight
        link.notify()
        await subscriber.wait_for(3 * OUTBOX_IN_FLIGHT + 50)
        async with asyncio.timeout(WAIT_S):
            while len(outbox):  # noqa: ASYNC110 - the last PUBACKs are on their way
                await asyncio.sleep(0.01)

    assert [m["n"] for m in subscriber.received] == list(range(3 * OUTBOX_IN_FLIGHT + 50))
    assert subscriber.duplicates == 0
    assert link.peak_in_flight == OUTBOX_IN_FLIGHT  # a full window, never more
    assert link.published == 3 * OUTBOX_IN_FLIGHT + 50
    assert len(outbox) == 0


async def test_a_broker_restart_mid_flight_resends_what_was_not_acknowledged(
    tmp_path: Path,
) -> None:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    mosquitto = Mosquitto(
        broker_dir,
        settings=f"persistence true\npersistence_location {broker_dir}/\n"
        "max_queued_messages 0\n",  # no limit: every acknowledged message stays queued
    )
    total = 20 * OUTBOX_IN_FLIGHT
    clock = VirtualClock()
    topics = Topics("bridge-5")
    outbox = Outbox(tmp_path / "outbox.sqlite3", bridge_id="bridge-5")
    link = MqttLink(
        MqttSettings("127.0.0.1", mosquitto.port, reconnect_initial_s=1.0),
        topics,
        outbox,
        clock=clock,
        rng=random.Random(1),
    )
    subscriber = PersistentSubscriber(mosquitto.port, topics.telemetry("SN1"))
    mosquitto.start()
    try:
        async with running(subscriber.run()), running(link.run()):
            async with asyncio.timeout(WAIT_S):
                await subscriber.subscribed.wait()
                await link.wait_connected()
            enqueue(outbox, topics, 0, total)
            link.notify()
            async with asyncio.timeout(WAIT_S):
                while link.published < OUTBOX_IN_FLIGHT:  # noqa: ASYNC110 - the broker's PUBACKs
                    await asyncio.sleep(0)
            in_flight_at_stop, waiting_at_stop = link.in_flight, len(outbox)
            mosquitto.stop()  # saves its sessions and what it acknowledged
            async with asyncio.timeout(WAIT_S):
                await link.wait_disconnected()
            # Only acknowledged messages left the outbox: at least everything still in
            # flight when the broker went away is waiting.
            assert len(outbox) >= in_flight_at_stop
            assert total - link.published == len(outbox)

            mosquitto.start()
            async with asyncio.timeout(WAIT_S):
                while not link.connected:  # the link waits out its backoff on the clock
                    await clock.advance(1.0)
                    await asyncio.sleep(0.01)
            await subscriber.wait_for(total)
            async with asyncio.timeout(WAIT_S):
                while len(outbox):  # noqa: ASYNC110 - the last PUBACKs are on their way
                    await asyncio.sleep(0.01)
    finally:
        mosquitto.stop()

    assert in_flight_at_stop > 1
    assert waiting_at_stop > in_flight_at_stop
    assert subscriber.unique() == list(range(total))  # everything, first seen in order
    assert link.connections == 2
    assert len(outbox) == 0


async def test_qos_0_messages_between_qos_1_ones_do_not_hold_the_outbox(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A QoS 0 message has no PUBACK: it counts as delivered once paho has written it, and
    the QoS 1 messages after it are retired as their PUBACKs come. (paho sends a QoS 0
    message at once, past QoS 1 ones waiting for room in its window: only the QoS 1
    messages keep their order.)"""
    topics = Topics("bridge-6")
    outbox = Outbox(tmp_path / "outbox.sqlite3", bridge_id="bridge-6")
    link = MqttLink(MqttSettings("127.0.0.1", mosquitto.port), topics, outbox, clock=VirtualClock())
    subscriber = Subscriber(mosquitto.port, topics.telemetry("SN1"))
    total = 60
    async with running(subscriber.run()), running(link.run()):
        async with asyncio.timeout(WAIT_S):
            await subscriber.subscribed.wait()
            await link.wait_connected()
        for n in range(total):
            body = {"message_id": outbox.message_id(outbox.next_sequence()), "n": n}
            outbox.append(topics.telemetry("SN1"), json.dumps(body).encode(), qos=1 if n % 3 else 0)
        link.notify()
        await subscriber.wait_for(total)
        async with asyncio.timeout(WAIT_S):
            while len(outbox):  # noqa: ASYNC110 - the last PUBACKs are on their way
                await asyncio.sleep(0.01)

    received = [int(str(m["n"])) for m in subscriber.received]
    assert sorted(received) == list(range(total))
    assert [n for n in received if n % 3] == [n for n in range(total) if n % 3]
    assert link.published == total
