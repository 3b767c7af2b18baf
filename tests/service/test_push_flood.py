"""Ten thousand hostile payloads on the push topic of a running bridge, then a valid push:
it is answered at once, the MQTT link is still the one it was, and the log says what
happened in a few lines rather than ten thousand.

The flood is published as an ordinary MQTT client publishes at QoS 1 (20 messages in
flight, each acknowledged by the broker); the valid push follows the last of them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devicebridge.core.signed_program import FORMAT, MAX_ENVELOPE_BYTES
from devicebridge.integrations.mqtt import Topics
from tests.broker import Mosquitto
from tests.service.conftest import WAIT_S, Therapist, routine_text, running, service_rig

SEED = 20261123
FLOOD = 10_000
ACK_WITHIN_S = 2.0  # wall time from the valid push's publish to its acknowledgement
MAX_LOG_LINES = 60
PUBLISH_WINDOW = 20  # publishes in flight at once: the default of MQTT clients (paho, aiomqtt)
# Mosquitto queues at most 1000 messages for a busy subscriber by default and drops the
# rest; this broker keeps them all, so that every one of the flood reaches the bridge.
BROKER_SETTINGS = "max_queued_messages 20000"


@pytest.fixture
def deep_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, settings=BROKER_SETTINGS)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _deep(rng: random.Random, good: dict[str, Any]) -> bytes:
    depth = rng.randrange(1_000, 64_000)
    shape = rng.randrange(5)
    if shape == 0:
        return b"[" * depth
    if shape == 1:
        return b'{"a":' * (depth // 5) + b"1" + b"}" * (depth // 5)
    if shape == 2:
        return b"[" * (depth // 2) + b"]" * (depth // 2)
    inner = "[" * (depth // 4) + "]" * (depth // 4)
    field = "metadata" if shape == 3 else "signature"
    text = json.dumps({**good, field: "INNER"}).replace('"INNER"', inner)
    return text.encode()


def _binary(rng: random.Random, good: dict[str, Any]) -> bytes:
    return rng.randbytes(rng.randrange(1, 4_000))


def _huge(rng: random.Random, good: dict[str, Any]) -> bytes:
    size = rng.randrange(MAX_ENVELOPE_BYTES + 1, 5 * MAX_ENVELOPE_BYTES)
    padded = json.dumps({**good, "padding": "x" * size}).encode()
    return padded if rng.random() < 0.5 else rng.randbytes(size)


def _truncated(rng: random.Random, good: dict[str, Any]) -> bytes:
    data = json.dumps(good).encode()
    return data[: rng.randrange(len(data))]


WRONG_VALUES: list[Callable[[random.Random], Any]] = [
    lambda rng: rng.randrange(-(2**70), 2**70),
    lambda rng: rng.random() * 1e308,
    lambda rng: None,
    lambda rng: rng.random() < 0.5,
    lambda rng: [1, "a", None],
    lambda rng: {"x": {"y": []}},
    lambda rng: "",
    lambda rng: "z" * rng.randrange(1, 30_000),
    lambda rng: "\ud800\udfff\u0000",
    lambda rng: rng.randbytes(8).hex() + "\n\r\t<script>[red]x[/red]",
]


def _wrong_types(rng: random.Random, good: dict[str, Any]) -> bytes:
    envelope = json.loads(json.dumps(good))
    value = rng.choice(WRONG_VALUES)(rng)
    if rng.random() < 0.5:
        envelope["metadata"][rng.choice(sorted(envelope["metadata"]))] = value
    else:
        envelope[rng.choice(sorted(envelope))] = value
    if rng.random() < 0.1:
        envelope = rng.choice([[envelope], "envelope", 3, None])
    return json.dumps(envelope).encode()


def _bad_signature(rng: random.Random, good: dict[str, Any]) -> bytes:
    envelope = json.loads(json.dumps(good))
    envelope["metadata"]["nonce"] = secrets.token_hex(16)  # each gets its own answer
    change = rng.randrange(4)
    if change == 0:
        envelope["signature"] = base64.b64encode(rng.randbytes(64)).decode()
    elif change == 1:
        envelope["program"] = envelope["program"].replace("5", str(rng.randrange(10)), 1) + " "
    elif change == 2:
        envelope["metadata"]["program_version"] = str(rng.randrange(10**6))
    else:
        envelope["key_id"] = rng.randbytes(8).hex()  # no such key
    return json.dumps(envelope).encode()


def _odd(rng: random.Random, good: dict[str, Any]) -> bytes:
    return rng.choice(
        [
            b"",
            b" \n\t ",
            b"null",
            b"NaN",
            b"[Infinity, -Infinity]",
            b"9" * rng.randrange(4_400, 60_000),  # beyond Python's integer digit limit
            b'"\\ud800"',
            b'{"format": "' + FORMAT.encode() + b'", "metadata": {"nonce": "\\udfff"}}',
            json.dumps(good).encode().replace(b'"', b"'"),
            b"\xef\xbb\xbf" + b"[" * 5_000,  # a byte-order mark, then deep nesting
            json.dumps(good).encode() + b"\x00",
            json.dumps(good).encode() * 2,
        ]
    )


KINDS: list[tuple[int, Callable[[random.Random, dict[str, Any]], bytes]]] = [
    (1_500, _deep),
    (1_500, _binary),
    (100, _huge),
    (1_500, _truncated),
    (2_000, _wrong_types),
    (2_000, _bad_signature),
    (1_400, _odd),
]


def hostile_payloads(good: dict[str, Any]) -> list[bytes]:
    rng = random.Random(SEED)
    payloads = [make(rng, good) for count, make in KINDS for _ in range(count)]
    rng.shuffle(payloads)
    assert len(payloads) == FLOOD
    return payloads


@pytest.mark.slow
async def test_ten_thousand_bad_payloads_then_a_valid_push_is_answered_at_once(
    deep_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mosquitto = deep_broker
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    topics = Topics("bridge-7")
    payloads = hostile_payloads(json.loads(therapist.sign(routine_text("firming"))))
    valid = therapist.sign(routine_text("firming"))
    valid_nonce = json.loads(valid)["metadata"]["nonce"]
    answered_at: list[float] = []
    acks: list[dict[str, Any]] = []

    async def listen(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            body = json.loads(message.payload)  # type: ignore[arg-type]
            acks.append(body)
            if body.get("nonce") == valid_nonce:
                answered_at.append(time.monotonic())

    caplog.set_level(logging.INFO)
    async with service_rig(tmp_path, broker_port=mosquitto.port, massagers=0) as rig:
        await rig.start()
        await rig.wait_broker_connected()
        async with (
            aiomqtt.Client("127.0.0.1", mosquitto.port) as listener,
            aiomqtt.Client(
                "127.0.0.1", mosquitto.port, max_inflight_messages=PUBLISH_WINDOW
            ) as pusher,
        ):
            pusher.pending_calls_threshold = PUBLISH_WINDOW  # aiomqtt warns above it
            await listener.subscribe(topics.program_ack, qos=1)
            async with running(listen(listener)):
                for start in range(0, FLOOD, PUBLISH_WINDOW):
                    await asyncio.gather(
                        *(
                            pusher.publish(topics.program_push, payload, qos=1)
                            for payload in payloads[start : start + PUBLISH_WINDOW]
                        )
                    )
                # The broker keeps one publisher's messages in order: this one comes last.
                published_at = time.monotonic()
                await pusher.publish(topics.program_push, valid, qos=1)
                async with asyncio.timeout(WAIT_S):
                    while not answered_at:  # noqa: ASYNC110 - the listener task sets it
                        await asyncio.sleep(0.01)
                link_tasks = [t for t in asyncio.all_tasks() if t.get_name() == "mqtt link"]
                assert [t.done() for t in link_tasks] == [False]
                assert rig.service.link is not None
                assert rig.service.link.connections == 1
                inbox = rig.service.inbox
                # Every payload reached the bridge and was answered or dropped.
                assert inbox.received == FLOOD + 1
                assert inbox.answered + inbox.dropped == FLOOD + 1
                assert inbox.accepted == 1
                stored = [p.id for p in rig.service.programs.programs()]
        await rig.stop()

    assert answered_at[0] - published_at <= ACK_WITHIN_S, answered_at[0] - published_at
    final = acks[-1]
    assert (final["nonce"], final["status"]) == (valid_nonce, "accepted"), final
    assert all(ack["status"] == "rejected" for ack in acks[:-1])
    assert len(acks) == inbox.answered
    assert stored == [final["program_id"]]
    lines = [r for r in caplog.records if r.name.startswith("devicebridge")]
    assert len(lines) <= MAX_LOG_LINES, [r.getMessage() for r in lines[-20:]]
    assert any("suppressed" in r.getMessage() for r in lines)
