"""Routines across link drops: lost commands are sent again, an outage is not a device fault.

Each test drops the BLE link at a chosen moment (a command on its way, a pause) and checks
that the routine still ends the way the policy says, with every sample stored once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from devicebridge.core.engine import DecisionKind
from devicebridge.core.policy import SafetyPolicy
from devicebridge.device.session import DeviceSession
from devicebridge.run.runner import RunMode
from devicebridge.storage.sessions import SessionStore
from protocols import Command, Opcode, Zone
from simulators import HandScript, HandSegment, SimulatedWorld, VirtualClock
from tests.hooked_transport import HookedTransport, Write

from .conftest import connect, massage_routine, massage_step, routine_from, runner_for

MAX_RUN_S = 300.0


def drop_on_first(
    session: DeviceSession, opcode: Opcode, drop: Callable[[], None]
) -> Callable[[], int]:
    """Drop the link just before the first write of ``opcode`` (which then fails)."""
    dropped = 0

    async def drop_first(data: bytes, write: Write) -> None:
        nonlocal dropped
        if not dropped and Command.decode(data).opcode == opcode:
            dropped += 1
            drop()
        await write(data)

    session.transport = HookedTransport(session.transport, control=drop_first)
    return lambda: dropped


def assert_stored_once(store: SessionStore, session_id: int | None) -> None:
    sequences, _ = store.telemetry(session_id or 0)
    assert sequences.size
    assert np.array_equal(sequences, np.arange(sequences[0], sequences[0] + sequences.size))


async def test_a_link_drop_as_the_routine_starts_is_not_a_device_ignoring_commands(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    # The hand is on the cheek all along, so the outage's samples are on the skin with the
    # motor off: the motor command never reached the device, it did not ignore it.
    hand = HandScript([HandSegment(0.5, 60.0, Zone.CHEEK_LEFT, 7.0)])
    massager = world.add_massager(hand=hand)
    routine = routine_from(massage_routine(massage_step("cheek_left", 10, 4.0, 12.0)), policy)
    async with world:
        clock.start()
        session = await connect(world, massager)
        await session.start()
        dropped = drop_on_first(
            session,
            Opcode.SET_INTENSITY,
            lambda: world.drop_link(massager, out_of_range_s=4.0),
        )
        result = await runner_for(session, routine, policy, store, mode=RunMode.HOST).run(
            max_duration_s=MAX_RUN_S
        )
        await session.close()

    assert dropped() == 1
    assert result.status == "completed", (result.status, result.end_reason)
    assert all(d.reason != "command_not_applied" for d in result.decisions)
    assert result.summary["command_errors"] >= 1  # the lost SET_INTENSITY, sent again
    assert_stored_once(store, result.session_id)


async def test_a_zone_change_lost_with_the_link_is_sent_again_after_a_long_outage(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    # The hand presses all along but says nothing of zones: the device is on the zone it
    # was last told (SET_ZONE). The link drops as the next step's SET_ZONE goes out, for
    # longer than the forehead's 60 s pass cap, so the backfilled outage pauses the routine
    # on zone_time; after the reconnect the device must be told its zone again, or the
    # routine stays paused until the session cap ends it.
    hand = HandScript([HandSegment(0.5, 400.0, Zone.NONE, 7.0)])
    massager = world.add_massager(hand=hand)
    routine = routine_from(
        massage_routine(
            massage_step("forehead", 5, 4.0, 12.0) + massage_step("cheek_left", 5, 4.0, 12.0)
        ),
        policy,
    )
    async with world:
        clock.start()
        session = await connect(world, massager)
        await session.start()
        zone_writes = 0

        def second_zone() -> None:
            nonlocal zone_writes
            zone_writes += 1

        async def drop_at_the_second_zone(data: bytes, write: Write) -> None:
            nonlocal zone_writes
            if Command.decode(data).opcode == Opcode.SET_ZONE:
                zone_writes += 1
                if zone_writes == 2:  # the cheek, after the forehead
                    world.drop_link(massager, out_of_range_s=70.0)
            await write(data)

        session.transport = HookedTransport(session.transport, control=drop_at_the_second_zone)
        result = await runner_for(session, routine, policy, store, mode=RunMode.HOST).run(
            max_duration_s=MAX_RUN_S
        )
        await session.close()

    assert zone_writes >= 3  # the lost one, and again after the reconnect
    assert result.status == "completed", (result.status, result.end_reason)
    reasons = [d.reason for d in result.decisions if d.kind is DecisionKind.PAUSE]
    assert reasons == ["zone_time"]
    assert massager.zone == Zone.CHEEK_LEFT
    assert result.summary["contact_s_by_zone"]["cheek_left"] == 5.0
    assert_stored_once(store, result.session_id)


async def test_a_safety_stop_does_not_drop_the_next_steps_zone(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    # A slow link: the first STOP_ALL takes 2 s to go out. Meanwhile the step ends (the
    # next zone is due) and a second press above the cap pauses again. The zone must still
    # reach the device once the stops are through, or the device stays on the forehead and
    # the routine pauses there on zone_time until the session cap ends it.
    hand = HandScript(
        [
            HandSegment(0.5, 3.5, Zone.NONE, 7.0),
            HandSegment(4.0, 0.1, Zone.NONE, 20.0),  # above the 15 kPa forehead cap
            HandSegment(4.1, 1.55, Zone.NONE, 7.0),  # the step's 5 s are done at about 5.6
            HandSegment(5.65, 0.1, Zone.NONE, 20.0),
            HandSegment(5.75, 300.0, Zone.NONE, 7.0),
        ]
    )
    massager = world.add_massager(hand=hand)
    routine = routine_from(
        massage_routine(
            massage_step("forehead", 5, 4.0, 12.0) + massage_step("cheek_left", 5, 4.0, 12.0)
        ),
        policy,
    )
    async with world:
        clock.start()
        session = await connect(world, massager)
        await session.start()
        slowed = False

        async def slow_first_stop(data: bytes, write: Write) -> None:
            nonlocal slowed
            if not slowed and Command.decode(data).opcode == Opcode.STOP_ALL:
                slowed = True
                await clock.sleep(2.0)
            await write(data)

        session.transport = HookedTransport(session.transport, control=slow_first_stop)
        result = await runner_for(session, routine, policy, store, mode=RunMode.HOST).run(
            max_duration_s=MAX_RUN_S
        )
        await session.close()

    kinds = [(d.kind, d.reason) for d in result.decisions]
    assert kinds.count((DecisionKind.PAUSE, "pressure_cap")) == 2, kinds
    assert result.status == "completed", (result.status, result.end_reason, kinds)
    assert massager.zone == Zone.CHEEK_LEFT
    assert_stored_once(store, result.session_id)
