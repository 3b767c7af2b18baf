"""1000 link drops across 10 massagers during routines, through the QA bridge fixture.

Drops come at random moments, and on purpose as a routine starts (its first motor
command) and as a step changes (the next zone's SET_ZONE); each device runs routines one
after another until its link dropped a hundred times. Every routine still completes or
stops for a reason the policy gives, and every sample is stored exactly once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import numpy as np
import pytest

from devicebridge.qa import QaBridge
from devicebridge.run.summary import RunSummary
from protocols import Command, Opcode, SetZone, Zone
from simulators import SimulatedDevice, SimulatedWorld
from tests.hooked_transport import HookedTransport, Write

DEVICES = 10
# Starter routines without a frequency limit, run one after another on each device.
ROUTINES = ("lymphatic_drainage", "masseter_relaxation", "post_treatment_drainage")
DROPS_PER_DEVICE = 100
MEAN_BETWEEN_DROPS_S = 4.0
MAX_OUT_OF_RANGE_S = 1.5
DROP_ON_STEP_CHANGE = 0.5  # the chance that a step's SET_ZONE goes out just as the link drops
MAX_RUN_S = 3600.0
RECONNECT_WAIT_S = 60.0  # virtual seconds: out of range for at most 1.5 s, then a reconnect
# What the policy may end a session for; anything else (a command the device seemed to
# ignore, a time limit, an interruption) would be the drops' doing.
POLICY_STOPS = {"pressure_cap_repeated", "session_length", "over_temperature", "sensor_stuck"}


class Dropper:
    """Drops one device's link: at random moments, and as commands of interest go out."""

    def __init__(self, world: SimulatedWorld, device: SimulatedDevice, rng: random.Random):
        self.world = world
        self.device = device
        self.rng = rng
        self.count = 0

    def drop(self) -> None:
        """Drop the link now, if it is up (a drop of a link already down is no drop)."""
        if self.count < DROPS_PER_DEVICE and self.device.is_connected:
            self.count += 1
            out_of_range_s = self.rng.uniform(0.0, MAX_OUT_OF_RANGE_S)
            self.world.drop_link(self.device, out_of_range_s=out_of_range_s)

    def on_writes(self, bridge: QaBridge) -> None:
        session = bridge.session(self.device)
        first_motor = True

        zone: Zone | None = None

        async def drop_on_steps(data: bytes, write: Write) -> None:
            nonlocal first_motor, zone
            command = Command.decode(data)
            if command.opcode == Opcode.SET_INTENSITY and first_motor:
                first_motor = False
                self.drop()  # as the routine starts
            elif command.opcode == Opcode.SET_ZONE:
                body = command.body()
                assert isinstance(body, SetZone)
                # A new zone is a step change (the same zone again restores it after a drop).
                if body.zone != zone and self.rng.random() < DROP_ON_STEP_CHANGE:
                    self.drop()
                zone = Zone(body.zone)
            await write(data)

        session.transport = HookedTransport(session.transport, control=drop_on_steps)

    async def at_random(self, bridge: QaBridge, running: Callable[[], bool]) -> None:
        """A drop a random while after each time the link is back (until the routine ends)."""
        session = bridge.session(self.device)
        while running() and self.count < DROPS_PER_DEVICE:
            await session.wait_ready()
            await self.world.clock.sleep(self.rng.expovariate(1.0 / MEAN_BETWEEN_DROPS_S))
            if running():
                self.drop()


@pytest.mark.slow
async def test_routines_survive_a_thousand_link_drops(
    bridge: QaBridge, sim_world: SimulatedWorld, sim_fleet: Callable[..., list[SimulatedDevice]]
) -> None:
    devices = sim_fleet(DEVICES)
    await bridge.connect(devices)
    rng = random.Random(sim_world.seed)
    droppers = [Dropper(sim_world, d, random.Random(rng.random())) for d in devices]
    for dropper in droppers:
        dropper.on_writes(bridge)
    runs = [
        asyncio.ensure_future(routines_until_dropped(bridge, device, dropper))
        for device, dropper in zip(devices, droppers, strict=True)
    ]
    drivers = [
        asyncio.ensure_future(dropper.at_random(bridge, lambda run=run: not run.done()))
        for dropper, run in zip(droppers, runs, strict=True)
    ]
    per_device: list[list[RunSummary]] = list(await asyncio.gather(*runs))
    await asyncio.gather(*drivers)

    assert sum(d.count for d in droppers) == DEVICES * DROPS_PER_DEVICE
    for device in devices:
        # The last drop may come as the last routine ends: its link comes back after that.
        await bridge.session(device).wait_ready(timeout_s=RECONNECT_WAIT_S)
    for device, results in zip(devices, per_device, strict=True):
        for result in results:
            check_run(bridge, device, result)
        assert bridge.session(device).reconnects >= DROPS_PER_DEVICE


async def routines_until_dropped(
    bridge: QaBridge, device: SimulatedDevice, dropper: Dropper
) -> list[RunSummary]:
    """Starter routines one after another until the device's link dropped often enough."""
    results: list[RunSummary] = []
    while dropper.count < DROPS_PER_DEVICE:
        routine = ROUTINES[len(results) % len(ROUTINES)]
        results.append(await bridge.run_routine(device, routine, max_duration_s=MAX_RUN_S))
    return results


def check_run(bridge: QaBridge, device: SimulatedDevice, result: RunSummary) -> None:
    assert result.status == "completed" or (
        result.status == "stopped" and result.end_reason in POLICY_STOPS
    ), (device.serial_number, result.status, result.end_reason)
    assert all(d.reason != "command_not_applied" for d in result.decisions)
    sequences, _ = bridge.store(device).telemetry(result.session_id or 0)
    assert sequences.size
    # Exactly once: every sequence from the first to the last, none twice.
    assert np.array_equal(sequences, np.arange(sequences[0], sequences[0] + sequences.size))
    assert result.summary["lost_samples"] == 0
