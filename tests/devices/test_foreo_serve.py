"""A FOREO served by `devicebridge serve` like any device: its state, a pushed program run by
time through the local API (counted for adherence), the session summary on MQTT with the
checks that applied, and a routine it cannot run refused and published with the reason.
Against a private Mosquitto."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from devicebridge.core.catalogue import default_catalogue
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import parse_routine
from devicebridge.device.session import DeviceSession, MassagerSession
from devicebridge.device.transport.ble import BleBackends
from devicebridge.device.transport.foreo import ForeoTransport
from devicebridge.errors import LocalApiError
from devicebridge.integrations.mqtt import MqttSettings
from devicebridge.service import local_api
from devicebridge.service.supervisor import BridgeService
from devicebridge.storage.lock import try_acquire
from devicebridge.storage.registry import PairedDevice
from simulators import SimulatedWorld, VirtualClock
from tests.broker import Mosquitto
from tests.service.conftest import BRIDGE, WAIT_S, Subscriber, Therapist, routine_text, running

SEED = 99
PROGRAM = b"""
[routine]
name = "LUNA morning"
author = "dr-lee"
version = "1"
device_kind = "massager"
category = "drainage"

[[steps]]
zone = "cheek_left"
timing = "time"
duration_s = 20
intensity = 3

[[steps]]
zone = "neck"
timing = "time"
duration_s = 16
intensity = 2
"""


async def test_a_foreo_in_serve_runs_a_program_by_time_and_publishes_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    clock = VirtualClock()
    world = SimulatedWorld(seed=SEED, clock=clock)
    luna = world.add_foreo(name="LUNA 4")
    identity = f"foreo@{luna.address}"
    family = default_catalogue().family("foreo")
    assert family is not None
    backends = BleBackends(world.scanner_backend, world.client_backend)

    def session_factory(paired: PairedDevice) -> DeviceSession:
        assert paired.family == "foreo"
        assert paired.last_address is not None
        transport = ForeoTransport(
            clock, family, address=paired.last_address, backends=backends, find_timeout_s=2.0
        )
        return MassagerSession(transport, clock, rng=random.Random(SEED), name=paired.name)

    paired = PairedDevice(
        name="luna",
        serial_number=identity,
        kind="massager",
        model="LUNA 4",
        transport="ble",
        last_address=luna.address,
        family="foreo",
    )
    async with world:
        lock = try_acquire(tmp_path)
        service = BridgeService(
            bridge_id=BRIDGE,
            data_dir=tmp_path,
            policy=default_policy(),
            clock=clock,
            devices=[paired],
            session_factory=session_factory,
            mqtt=MqttSettings("127.0.0.1", mosquitto.port, reconnect_initial_s=0.5),
            rng=random.Random(SEED),
        )
        clock.start()
        topics = service.topics
        subscriber = Subscriber(
            mosquitto.port, topics.session_summaries, topics.device_state(identity)
        )
        try:
            async with running(subscriber.run()), running(service.run()):
                async with asyncio.timeout(WAIT_S):
                    await subscriber.subscribed.wait()
                    await service.wait_started()
                    worker = service.workers[identity]
                    while worker.batcher is None:  # noqa: ASYNC110 - virtual time moves
                        await asyncio.sleep(0.005)
                therapist = Therapist()
                therapist.trust_on(tmp_path)
                ack = service.handle_push(therapist.sign(PROGRAM))
                assert ack is not None
                assert ack["status"] == "accepted", ack
                program_id = int(ack["program_id"])
                # Nothing to install on a device that holds no programs: it runs them from
                # the host, and no install is waited for.
                assert service.adherence()["programs"][0]["pending_on"] == []

                connection = await local_api.connect(tmp_path)
                assert connection is not None
                async with asyncio.timeout(WAIT_S):
                    result = await local_api.run_on_bridge(
                        connection, {"device": "luna", "program_id": program_id}
                    )
                assert result.status == "completed", result
                adherence = service.adherence()

                # A routine that needs pressure: refused, with the reason, and published.
                connection = await local_api.connect(tmp_path)
                assert connection is not None
                firming = routine_text("firming").decode()
                with pytest.raises(LocalApiError, match="does not measure pressure or contact"):
                    async with asyncio.timeout(WAIT_S):
                        await local_api.run_on_bridge(
                            connection,
                            {"device": "luna", "routine_text": firming, "label": "firming"},
                        )
                async with asyncio.timeout(WAIT_S):
                    while len(subscriber.on("sessions/summary")) < 2:  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
                states = subscriber.on("/state")
        finally:
            await clock.stop()
            lock.release()

    completed, refusal = subscriber.on("sessions/summary")
    assert completed["serial"] == identity
    assert completed["status"] == "completed"
    assert completed["program_id"] == program_id
    summary = completed["summary"]
    assert summary["checks"]["pressure"] == "not measured by this device"
    assert summary["by_time"] is True
    assert summary["time_s_by_zone"] == {"cheek_left": 20.0, "neck": 16.0}
    (session,) = adherence["sessions"]
    assert (session["program_id"], session["status"]) == (program_id, "completed")
    assert refusal["status"] == "refused"
    assert "steps[1].pressure_kpa" in refusal["end_reason"]
    assert refusal["summary"]["device_problems"][0]["path"] == "steps[1].pressure_kpa"
    assert any(s["state"] == "ready" and s["model"] == "LUNA 4" for s in states)
    assert all(s["serial"] == identity for s in states)
    # The program's steps ran within their zones' intensity caps (cheek 8, neck 4).
    assert max(speed for _, speed in luna.speed_log) == 3
    parse_routine(PROGRAM.decode(), default_policy())  # the program is a valid routine
