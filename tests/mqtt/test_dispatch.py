"""The MQTT link's dispatch of received messages: a handler that raises loses that one
message (with a log line), never the link."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiomqtt
import pytest

from devicebridge.integrations.mqtt import MqttLink, MqttSettings, Topics
from devicebridge.storage.outbox import Outbox
from simulators import VirtualClock
from tests.broker import Mosquitto
from tests.mqtt.test_outbox_link import WAIT_S, running


async def test_a_handler_that_raises_does_not_end_the_link(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics = Topics("bridge-5")
    handled: list[bytes] = []
    last = asyncio.Event()

    async def handler(topic: str, payload: bytes) -> None:
        if payload.startswith(b"boom"):
            raise RecursionError("a bug in a handler")
        handled.append(payload)
        if payload == b"last":
            last.set()

    link = MqttLink(
        MqttSettings("127.0.0.1", mosquitto.port),
        topics,
        Outbox(tmp_path / "o.sqlite3", bridge_id="bridge-5"),
        clock=VirtualClock(),
        subscriptions=[topics.program_push],
        on_message=handler,
    )
    with caplog.at_level(logging.WARNING, logger="devicebridge.integrations.mqtt"):
        async with running(link.run()) as task:
            async with asyncio.timeout(WAIT_S):
                await link.wait_connected()
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                await client.publish(topics.program_push, b"first", qos=1)
                for n in range(200):
                    await client.publish(topics.program_push, b"boom %d" % n, qos=1)
                await client.publish(topics.program_push, b"last", qos=1)
            async with asyncio.timeout(WAIT_S):
                await last.wait()
            assert not task.done()
    assert handled == [b"first", b"last"]
    assert link.connections == 1
    failures = [r for r in caplog.records if "handler" in r.getMessage()]
    # Logged, with the traceback of the bug, but not two hundred times.
    assert failures
    assert failures[0].exc_info is not None
    assert len(failures) < 20
