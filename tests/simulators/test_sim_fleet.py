"""Massagers sampled together (the fleet) give the bytes each gives on its own.

A world's massagers take their samples together at their ticks
(:mod:`simulators.devices.fleet`); ``fleet_generation=False`` makes each take its own, the
way every device did before the fleet existed. The runs below go through what changes a
device's samples: default and guided hands, contact chatter at the thresholds, a program
switching the motor mid-block, batteries running low and out, buttons, another hand, and
faults on the device's seams (sensor noise, a stuck sensor, drift, a low battery, a reboot,
a drifting firmware clock), at live ticks and in long blocks. Their digests were recorded
from the per-device code before the fleet, so both ways are also checked against it.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from bleak import BleakClient
from bleak.backends.characteristic import BleakGATTCharacteristic

from protocols import (
    CONTROL_CHAR_UUID,
    EVENTS_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    Command,
    MassageMode,
    SetIntensity,
    SetMode,
    SetZone,
    StartStream,
    Zone,
)
from simulators import HandScript, HandSegment, SimulatedMassager, SimulatedWorld, VirtualClock
from simulators.faults.injector import FaultInjector
from simulators.faults.spec import make_fault
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import HandAction

from .conftest import Commander, RecordingLink, streaming
from .test_sim_sample_paths import massage_program, start_program

# (seed, batch interval) -> digest of every device's messages and ring, per device.
PER_DEVICE_DIGESTS = {
    (1, 0.1): "528b2aa7564fdff0",
    (7, 0.1): "c98d34634ebe1a75",
    (42, 0.1): "563b0d9297c95017",
    (3, 0.47): "c82274f0b44b48f3",
    (5, 5.0): "f18bafdb02e59d8d",
}
RUN_S = 20.0  # the virtual time run_world runs
FAULTS = (
    ("noise", {"sigma": 0.5, "at_s": 2.0, "duration_s": 6.0}),
    ("stuck_sensor", {"at_s": 3.05, "duration_s": 4.0}),
    ("drift", {"per_s": 0.2}),
    ("low_battery", {"percent": 5.0, "empty_after_s": 9.0, "at_s": 4.0}),
    ("reboot", {"at_s": 6.0}),
    ("clock_drift", {"ppm": 20000.0}),
)


async def run_world(
    seed: int, batch_interval_s: float, *, fleet_generation: bool
) -> tuple[list[tuple[str, int]], SimulatedWorld]:
    """Per device: a digest of what it sent and what its ring holds, and the message count."""
    clock = VirtualClock()
    world = SimulatedWorld(seed=seed, clock=clock, fleet_generation=fleet_generation)
    options = {"batch_interval_s": batch_interval_s}
    hover = HandScript(
        [
            HandSegment(0.5, 4.0, Zone.FOREHEAD, 0.1, 0.4),  # chatters around contact
            HandSegment(5.0, 3.0, Zone.EYE_AREA_LEFT, 0.25),
            HandSegment(8.5, 2.0, Zone.NECK, 0.2, contact=False),
            HandSegment(11.0, 5.0, Zone.CHIN, 30.0, 900.0),  # past the sensor's full scale
        ],
        loop=True,
        period_s=17.0,
    )
    program_hand = HandScript(
        [
            HandSegment(1.5, 2.0, Zone.CHEEK_LEFT, 8.0),
            HandSegment(3.5, 0.6, Zone.CHEEK_LEFT, 18.0),  # above the cap
            HandSegment(4.1, 3.0, Zone.CHEEK_LEFT, 8.0),
            HandSegment(7.5, 6.0, Zone.CHIN, 10.0),
        ]
    )
    guided = ScenarioHand(
        [
            HandAction("*", 6.0, 1.5, "lift", Zone.JAWLINE_LEFT),
            HandAction("*", 9.0, 2.0, "press", Zone.CHIN, 5.0, 12.0),
        ],
        guided=True,
    )
    devices = [
        world.add_massager(**options),
        world.add_massager(hand=hover, **options),
        world.add_massager(hand=program_hand, **options),
        world.add_massager(  # runs empty
            hand=HandScript.constant(Zone.MASSETER_LEFT, 30.0), battery_percent=0.2, **options
        ),
        world.add_massager(battery_percent=10.05, **options),
        world.add_massager(hand=guided, **options),  # type: ignore[arg-type]
    ]
    guided.follow(devices[5])
    faulted = [world.add_massager(**options) for _ in FAULTS]
    plain = [world.add_massager(**options) for _ in range(4)]
    everyone: list[SimulatedMassager] = devices + faulted + plain
    links: list[RecordingLink] = []
    injectors: list[FaultInjector] = []
    async with world:
        for device, (kind, fault_options) in zip(faulted, FAULTS, strict=True):
            injector = FaultInjector(device, seed=world.seed, world=world)
            injector.add(make_fault(kind, where="test", **fault_options))
            injector.start()
            injectors.append(injector)
        for device in everyone:
            link, command = streaming(device)
            links.append(link)
            if device is devices[2]:
                start_program(command, device, massage_program())
            elif device is devices[5]:
                command(SetZone(Zone.CHEEK_LEFT))
                command(SetIntensity(3))
                command(SetMode(MassageMode.VIBRATION))
            else:
                command(SetIntensity(10 if device is devices[3] else 4))
                command(SetMode(MassageMode.PULSE))
        await clock.advance(3.33)
        Commander(devices[0], links[0])(SetZone(Zone.NECK))
        devices[1].press_power()
        await clock.advance(4.0)
        Commander(devices[5], links[5])(SetZone(Zone.FOREHEAD))
        plain[0].press_mode()
        await clock.advance(0.05)
        plain[1].hold_hand(HandScript.constant(Zone.CHIN, 0.2))
        await clock.advance(12.62)
        for injector in injectors:
            injector.stop()
    digests = []
    for device, link in zip(everyone, links, strict=True):
        digest = hashlib.sha256()
        for channel, message in link.messages:
            digest.update(channel.value.encode())
            digest.update(len(message).to_bytes(4, "little"))
            digest.update(message)
        digest.update(device.ring.range(0, device.ring.next_sequence)[1].tobytes())
        digests.append((digest.hexdigest()[:16], len(link.messages)))
    return digests, world


def whole(digests: list[tuple[str, int]]) -> str:
    return hashlib.sha256(repr(digests).encode()).hexdigest()[:16]


@pytest.mark.parametrize(("seed", "batch_interval_s"), list(PER_DEVICE_DIGESTS))
async def test_fleet_gives_each_device_its_own_bytes(seed: int, batch_interval_s: float) -> None:
    alone, _ = await run_world(seed, batch_interval_s, fleet_generation=False)
    together, world = await run_world(seed, batch_interval_s, fleet_generation=True)
    # Device by device, so that a difference names the device.
    assert together == alone
    assert whole(alone) == PER_DEVICE_DIGESTS[seed, batch_interval_s]
    fleet = world.fleet
    assert fleet is not None
    assert len(fleet.members) == 16
    # Most blocks were taken with other devices: of the 16 massagers, one is on its own
    # clock (drifting), one boots again, one runs empty, over 20 s of ticks.
    ticks = int(RUN_S / batch_interval_s)
    assert fleet.blocks_together > 0.6 * len(fleet.members) * ticks
    assert all(count > 20 for _, count in together)


async def test_fleet_bytes_over_the_bleak_backend() -> None:
    """What a host receives over bleak from ten streaming massagers, either way."""

    async def run(fleet_generation: bool) -> list[bytes]:
        clock = VirtualClock()
        world = SimulatedWorld(seed=9, clock=clock, fleet_generation=fleet_generation)
        devices = [world.add_massager() for _ in range(10)]
        received: list[list[bytes]] = [[] for _ in devices]
        clients = []
        async with world:
            for device, log in zip(devices, received, strict=True):
                client = BleakClient(device.address, backend=world.client_backend)
                await client.connect()
                clients.append(client)

                def keep(
                    characteristic: BleakGATTCharacteristic,
                    data: bytearray,
                    log: list[bytes] = log,
                ) -> None:
                    log.append(characteristic.uuid.encode() + bytes(data))

                for uuid in (TELEMETRY_CHAR_UUID, EVENTS_CHAR_UUID, CONTROL_CHAR_UUID):
                    await client.start_notify(uuid, keep)
                await client.write_gatt_char(
                    CONTROL_CHAR_UUID, Command.of(1, StartStream()).encode(), response=True
                )
                await client.write_gatt_char(
                    CONTROL_CHAR_UUID, Command.of(2, SetIntensity(5)).encode(), response=True
                )
                await client.write_gatt_char(
                    CONTROL_CHAR_UUID,
                    Command.of(3, SetMode(MassageMode.PERCUSSION)).encode(),
                    response=True,
                )
            await clock.advance(45.0)
            for client in clients:
                await client.disconnect()
        return [b"".join(log) for log in received]

    alone = await run(False)
    together = await run(True)
    assert all(len(stream) > 40_000 for stream in alone)
    assert together == alone


async def streaming_world(
    fleet_generation: bool, devices: int = 4
) -> tuple[SimulatedWorld, list[SimulatedMassager], list[RecordingLink]]:
    """A world of ``devices`` massagers booted together (one tick cohort), not started."""
    world = SimulatedWorld(seed=3, clock=VirtualClock(), fleet_generation=fleet_generation)
    return world, [world.add_massager() for _ in range(devices)], []


def stream_from(devices: list[SimulatedMassager], links: list[RecordingLink]) -> None:
    for device in devices:
        link, command = streaming(device)
        links.append(link)
        command(SetIntensity(4))
        command(SetMode(MassageMode.VIBRATION))


async def test_a_cohort_wakes_once_a_tick() -> None:
    """Massagers booted together share one sampling loop: one clock sleeper for all."""
    sleepers = {}
    for fleet_generation in (False, True):
        world, devices, links = await streaming_world(fleet_generation, devices=10)
        async with world:
            stream_from(devices, links)
            await world.clock.advance(1.05)
            sleepers[fleet_generation] = world.clock.pending_sleepers
            assert all(len(link.batches()) == 10 for link in links)
    assert sleepers[False] - sleepers[True] == 9


async def test_a_member_that_leaves_the_fleet_goes_on_alone_with_the_same_bytes() -> None:
    received = {}
    for fleet_generation in (False, True):
        world, devices, links = await streaming_world(fleet_generation)
        async with world:
            stream_from(devices, links)
            await world.clock.advance(2.33)
            if world.fleet is not None:
                world.fleet.remove(devices[1])
            await world.clock.advance(2.0)
            assert devices[1].is_sampling
        received[fleet_generation] = [link.messages for link in links]
    assert received[True] == received[False]
    assert all(len(messages) > 40 for messages in received[True])


async def test_stopped_members_leave_their_cohort_and_its_loop_ends() -> None:
    world, devices, links = await streaming_world(True)
    async with world:
        stream_from(devices, links)
        await world.clock.advance(1.0)
        await devices[0].stop()
        sent_before = [len(link.messages) for link in links]
        await world.clock.advance(1.0)
        sent_after = [len(link.messages) for link in links]
        assert sent_after[0] == sent_before[0]
        assert all(a > b for a, b in zip(sent_after[1:], sent_before[1:], strict=True))
        for device in devices[1:]:
            await device.stop()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("fleet ticker")]


async def test_a_tick_that_fails_ends_only_its_own_device() -> None:
    world, devices, links = await streaming_world(True)
    broken = RuntimeError("a bug in a tick")

    def fail() -> None:
        raise broken

    async def run() -> None:
        async with world:
            stream_from(devices, links)
            await world.clock.advance(1.0)
            devices[2]._flush = fail  # type: ignore[method-assign]
            sent_before = [len(link.messages) for link in links]
            await world.clock.advance(1.0)
            assert devices[2].task_exception() is broken
            assert not devices[2].is_sampling
            assert all(
                len(link.messages) > before
                for link, before, device in zip(links, sent_before, devices, strict=True)
                if device is not devices[2]
            )

    # The world reports the crash when it closes.
    with pytest.raises(RuntimeError, match="a simulator task crashed") as crashed:
        await run()
    assert crashed.value.__cause__ is broken


async def test_a_cohort_whose_samples_cannot_be_taken_ends_its_devices_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, devices, links = await streaming_world(True)
    broken = RuntimeError("a bug in the generation")
    fleet = world.fleet
    assert fleet is not None

    def fail(_: object) -> None:
        raise broken

    async def run() -> None:
        async with world:
            stream_from(devices, links)
            await world.clock.advance(1.0)
            monkeypatch.setattr(fleet, "take_together", fail)
            await world.clock.advance(0.2)
            assert all(device.task_exception() is broken for device in devices)
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("fleet ticker")]

    with pytest.raises(RuntimeError, match="a simulator task crashed") as crashed:
        await run()
    assert crashed.value.__cause__ is broken
