"""Signed programs pushed over a real Mosquitto: accepted and installed, or rejected with
the reason and never stored or sent to a device."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from devicebridge.cli.service import push_envelope
from devicebridge.core.signed_program import MAX_ENVELOPE_BYTES, ProgramRejectedError
from devicebridge.integrations.mqtt import MqttSettings, Topics, read_retained
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from tests.broker import Mosquitto
from tests.service.conftest import (
    BRIDGE,
    WAIT_S,
    Therapist,
    routine_text,
    service_rig,
)

UNSAFE_ROUTINE = routine_text("firming").replace(
    b"pressure_kpa = { min = 4.0, max = 12.0 }", b"pressure_kpa = { min = 4.0, max = 40.0 }", 1
)


async def push(port: int, envelope: bytes, client: str = BRIDGE) -> dict[str, object]:
    ack = await push_envelope(MqttSettings("127.0.0.1", port), client, envelope, timeout_s=WAIT_S)
    assert ack is not None, "no acknowledgement"
    return ack


def stored_programs(data_dir: Path) -> int:
    store = ProgramStore(data_dir / PROGRAMS_FILENAME)
    try:
        return len(store.programs())
    finally:
        store.close()


async def test_a_trusted_program_is_accepted_stored_and_installed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    async with service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.start()
        worker = next(iter(rig.service.workers.values()))
        await rig.wait(lambda: worker.batcher is not None)
        await rig.wait_broker_connected()

        ack = await push(mosquitto.port, therapist.sign(routine_text("firming")))

        assert ack["status"] == "accepted", ack
        assert ack["routine"] == "Firming: cheeks, jawline, chin"
        programs = rig.service.programs.programs()
        assert [p.id for p in programs] == [ack["program_id"]]
        # Installed on the connected massager (over the device program transfer).
        await rig.wait(lambda: bool(rig.service.programs.programs()[0].installed_on))
        assert rig.service.programs.programs()[0].installed_on == (worker.serial,)
        assert rig.service.adherence()["programs"][0]["pending_on"] == []
        committed = rig.devices[0].program_receiver.committed
        assert committed is not None, "the device holds no program"
        assert len(committed.steps) == 5  # the firming routine's steps
        await rig.stop()

    # The retained adherence message tells the therapist what is where.
    topics = Topics(BRIDGE)
    retained = await read_retained(
        MqttSettings("127.0.0.1", mosquitto.port),
        [topics.programs_installed],
        wait_for=topics.programs_installed,
        timeout_s=WAIT_S,
    )
    adherence = json.loads(retained[topics.programs_installed])
    assert [p["program_id"] for p in adherence["programs"]] == [ack["program_id"]]


async def test_every_bad_program_is_rejected_with_its_reason_and_never_stored(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    therapist, stranger = Therapist(), Therapist("dr-nobody")
    therapist.trust_on(tmp_path)
    good = routine_text("firming")
    envelope = json.loads(therapist.sign(good))
    altered = dict(envelope, program=envelope["program"].replace("intensity = 5", "intensity = 9"))
    unsigned = {k: v for k, v in envelope.items() if k not in ("signature", "key_id")}
    long_ago = datetime.now(UTC) - timedelta(days=30)
    padded = dict(envelope, padding="x" * MAX_ENVELOPE_BYTES)

    cases: list[tuple[str, bytes]] = [
        ("unsigned", json.dumps(unsigned).encode()),
        ("unknown_key", stranger.sign(good)),
        ("bad_signature", json.dumps(altered).encode()),
        ("expired", therapist.sign(good, issued_at=long_ago, valid_for=timedelta(days=1))),
        ("not_yet_valid", therapist.sign(good, issued_at=datetime.now(UTC) + timedelta(days=2))),
        ("wrong_client", therapist.sign(good, client="bridge-9")),
        ("wrong_therapist", dataclasses.replace(stranger, key=therapist.key).sign(good)),
        ("validity_too_long", therapist.sign(good, valid_for=timedelta(days=31))),
        ("malformed", json.dumps({**envelope, "format": "something-else"}).encode()),
        ("malformed", json.dumps({**envelope, "signature": "not base64!"}).encode()),
        ("unsafe", therapist.sign(UNSAFE_ROUTINE)),
        ("malformed", therapist.sign(b"[routine]\nname = 'no steps'\n")),
    ]
    # Nobody could match an answer to these: no readable nonce (or too large to read).
    unanswerable = [b"{not json", json.dumps({"format": "x"}).encode(), json.dumps(padded).encode()]
    async with service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.start()
        worker = next(iter(rig.service.workers.values()))
        await rig.wait(lambda: worker.batcher is not None)
        # A push published before the bridge subscribed would be dropped by the broker.
        await rig.wait_broker_connected()

        answers = [(expected, await push(mosquitto.port, data)) for expected, data in cases]
        for expected, ack in answers:
            assert (ack["status"], ack["reason"]) == ("rejected", expected), ack
            assert ack["detail"]
        unsafe_detail = next(str(a["detail"]) for e, a in answers if e == "unsafe")
        assert "pressure_kpa" in unsafe_detail
        assert "source" in unsafe_detail

        # The pushing command refuses them; published anyway, they go unanswered.
        for data in unanswerable:
            with pytest.raises(ProgramRejectedError, match="without an answer"):
                await push(mosquitto.port, data)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as raw:
            for data in unanswerable:
                await raw.publish(Topics(BRIDGE).program_push, data, qos=1)
        before = len(rig.service.acks)
        await rig.wait(lambda: rig.service.inbox.dropped == len(unanswerable))
        assert len(rig.service.acks) == before

        assert rig.service.programs.programs() == []
        assert rig.devices[0].program_receiver.committed is None  # nothing reached the device

        # A replay of an accepted program is refused, also after a restart (nonce kept).
        first = therapist.sign(good)
        assert (await push(mosquitto.port, first))["status"] == "accepted"
        assert (await push(mosquitto.port, first))["reason"] == "replayed"
        # Only the accepted one is stored, so only it can ever be installed on a device.
        assert len(rig.service.programs.programs()) == 1
        await rig.wait(lambda: bool(rig.service.programs.programs()[0].installed_on))
        assert worker.session.stats.command_timeouts == 0
        assert [p["program_id"] for p in rig.service.adherence()["programs"]] == [1]
        await rig.stop()

    async with service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.start()
        await rig.wait_broker_connected()
        assert (await push(mosquitto.port, first))["reason"] == "replayed"
        await rig.stop()
    assert stored_programs(tmp_path) == 1


async def test_no_answer_for_another_bridge_and_acks_stay_on_their_bridge(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    async with service_rig(tmp_path, broker_port=mosquitto.port, massagers=0) as rig:
        await rig.start()
        await rig.wait_broker_connected()
        # Pushed to bridge-9's topic: bridge-7 never sees it, so nobody answers.
        ack = await push_envelope(
            MqttSettings("127.0.0.1", mosquitto.port),
            "bridge-9",
            therapist.sign(routine_text(), client="bridge-9"),
            timeout_s=0.5,
        )
        assert ack is None
        assert rig.service.acks == []
        await asyncio.sleep(0)
        await rig.stop()


async def test_a_push_made_while_the_bridge_is_offline_waits_at_the_broker(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    # A first run opens the bridge's persistent session (with its subscription) at the broker.
    async with service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.start()
        await rig.wait_broker_connected()
        await rig.stop()

    # The therapist pushes while the bridge is off: the broker acknowledges and keeps it.
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as therapist_client:
        await therapist_client.publish(
            Topics(BRIDGE).program_push, therapist.sign(routine_text("firming")), qos=1
        )
    assert stored_programs(tmp_path) == 0

    async with service_rig(tmp_path, broker_port=mosquitto.port) as rig:
        await rig.start()
        await rig.wait(lambda: bool(rig.service.acks))
        assert [ack["status"] for ack in rig.service.acks] == ["accepted"], rig.service.acks
        await rig.wait(lambda: bool(rig.service.programs.programs()[0].installed_on))
        await rig.stop()
    assert stored_programs(tmp_path) == 1


def link_task() -> asyncio.Task[object]:
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "mqtt link"]
    return task


async def test_a_deeply_nested_payload_leaves_the_link_answering(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    async with service_rig(tmp_path, broker_port=mosquitto.port, massagers=0) as rig:
        await rig.start()
        await rig.wait_broker_connected()
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as attacker:
            await attacker.publish(Topics(BRIDGE).program_push, b"[" * 64_000, qos=1)

        ack = await push(mosquitto.port, therapist.sign(routine_text("firming")))

        assert ack["status"] == "accepted", ack
        assert not link_task().done()
        assert rig.service.link is not None
        assert rig.service.link.connections == 1
        await rig.stop()
