"""Devices run programs by themselves: steps, hard limits, dose caps, and a link that drops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt

from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.reassembly import TelemetryItem
from devicebridge.device.program_transfer import (
    install_program,
    program_from_routine,
    start_program,
)
from devicebridge.device.session import Subscription
from devicebridge.storage.sessions import SessionStore
from protocols import (
    DeviceKind,
    EventCode,
    HardLimit,
    HardLimitEvent,
    LedProgramStep,
    MassageMode,
    MassageProgramStep,
    Program,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramEndReason,
    ProgramFinishedEvent,
    ProgramLimits,
    ProgramStart,
    ProgramStepEvent,
    ProgramStepReason,
    SampleFormat,
    TelemetryBatch,
    Zone,
    program_crc32,
)
from protocols.telemetry import (
    LED_MASK_FLAG_PROGRAM_RUNNING,
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    MASSAGER_FLAG_PROGRAM_RUNNING,
)
from simulators import (
    Channel,
    HandScript,
    HandSegment,
    SimulatedDevice,
    SimulatedWorld,
    VirtualClock,
)

from .conftest import (
    EventLog,
    RecordingLink,
    ble_session,
    collect_events,
    command,
    follow_program,
    library_routine,
    step_done_times_s,
)

MASSAGER_RATE_HZ = 100
MASK_RATE_HZ = 10
HAND_START_S = 2.0  # before the no-contact pause of a program started at once
SAMPLE_MS = 1000 // MASSAGER_RATE_HZ


def run_directly(device: SimulatedDevice, link: RecordingLink, program: Program) -> None:
    """Install and start a program by talking to the device model (no host)."""
    data = program.encode()
    assert command(device, link, ProgramBegin(1, len(data), program_crc32(data))).ok
    for offset in range(0, len(data), 20):
        device.receive(
            Channel.PROGRAM, ProgramChunk(1, offset, data[offset : offset + 20]).encode()
        )
    assert command(device, link, ProgramCommit(1)).ok
    assert command(device, link, ProgramStart()).ok


def samples_since(device: SimulatedDevice, first_sequence: int) -> npt.NDArray[np.void]:
    first, samples = device.ring.range(first_sequence, device.next_sequence - first_sequence)
    assert first == first_sequence
    return samples


def step_events(events: list[tuple[int, EventCode | int, bytes]]) -> list[tuple[int, int, int]]:
    return [
        (t, ProgramStepEvent.decode(p).step_index, int(ProgramStepEvent.decode(p).reason))
        for t, c, p in events
        if c == EventCode.PROGRAM_STEP
    ]


def progress(log: EventLog) -> list[tuple[int, int, int]]:
    """PROGRAM_STEP events that move the program on (not pauses and resumptions)."""
    moving = (ProgramStepReason.STARTED, ProgramStepReason.STEP_DONE)
    return [s for s in log.steps() if s[2] in moving]


async def wait_finished(log: EventLog, clock: VirtualClock, limit_s: float) -> None:
    deadline_s = clock.now_s() + limit_s
    while not log.finished():
        assert clock.now_s() < deadline_s, "no PROGRAM_FINISHED in time"
        await clock.sleep(1.0)


def expected_steps(
    program: Program, hand: HandScript, start_ms: int, until_s: float
) -> tuple[list[tuple[int, int, int]], int]:
    """PROGRAM_STEP (time ms, index, reason) and the finish time the hand leads to."""
    done_s = step_done_times_s(
        hand, program, from_s=start_ms / 1000, rate_hz=MASSAGER_RATE_HZ, until_s=until_s
    )
    done_ms = [round(t * 1000) for t in done_s]
    steps = [(start_ms, 0, int(ProgramStepReason.STARTED))]
    steps += [(t, i + 1, int(ProgramStepReason.STEP_DONE)) for i, t in enumerate(done_ms[:-1])]
    return steps, done_ms[-1]


def assert_close_ms(
    actual: list[tuple[int, int, int]], expected: list[tuple[int, int, int]]
) -> None:
    assert [a[1:] for a in actual] == [e[1:] for e in expected]
    for (got, *_), (want, *_) in zip(actual, expected, strict=True):
        assert abs(got - want) <= SAMPLE_MS, (got, want)


async def test_massager_runs_the_firming_routine_by_itself(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy
) -> None:
    program = program_from_routine(library_routine("firming", policy), policy)
    hand = follow_program(program, start_s=HAND_START_S)
    massager = world.add_massager(hand=hand)
    async with world:
        clock.start()
        session = await ble_session(world, massager)
        log = EventLog([])
        reader = asyncio.get_running_loop().create_task(collect_events(session.events(), log))
        await session.start()
        await install_program(session, program)
        await start_program(session)
        commands_at_start = massager.commands_received
        await wait_finished(log, clock, 600.0)
        # Not one command from the host after PROGRAM_START.
        assert massager.commands_received == commands_at_start
        await session.close()
        await reader

    (start_ms, _, _), *_ = log.steps()
    expected, finish_ms = expected_steps(program, hand, start_ms, 400.0)
    assert_close_ms(progress(log), expected)
    assert progress(log) == log.steps()  # the hand never left the skin long enough to pause
    ((finished_ms, reason),) = log.finished()
    assert reason == ProgramEndReason.COMPLETED
    assert abs(finished_ms - finish_ms) <= SAMPLE_MS
    assert not massager.program_running
    assert not massager.motor_on
    assert log.of(EventCode.HARD_LIMIT) == []


async def test_pressure_above_the_cap_stops_the_motor_in_that_very_sample(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    # One cheek step of 30 s, band 4-12 kPa, cap 15 kPa. The hand presses 8 kPa, then
    # 18 kPa (above the cap), then 14 kPa (below the cap, above the band), then 8 again.
    step = MassageProgramStep(Zone.CHEEK_LEFT, MassageMode.VIBRATION, 5, 300, 400, 1200, 1500)
    program = Program(DeviceKind.MASSAGER, ProgramLimits(600, 4300, 30), (step,))
    hand = HandScript(
        [
            HandSegment(2.0, 4.0, Zone.CHEEK_LEFT, 8.0),
            HandSegment(6.0, 2.0, Zone.CHEEK_LEFT, 18.0),
            HandSegment(8.0, 1.0, Zone.CHEEK_LEFT, 14.0),
            HandSegment(9.0, 60.0, Zone.CHEEK_LEFT, 8.0),
        ]
    )
    massager = world.add_massager(hand=hand)
    async with world:
        link = RecordingLink()
        massager.attach_link(link)
        await clock.advance(1.0)
        first = massager.next_sequence
        run_directly(massager, link, program)
        await clock.advance(40.0)
        samples = samples_since(massager, first)

    seconds = (first + np.arange(samples.shape[0])) / MASSAGER_RATE_HZ
    flags = samples["flags"]
    motor = (flags & MASSAGER_FLAG_MOTOR_ON) != 0
    running = (flags & MASSAGER_FLAG_PROGRAM_RUNNING) != 0
    above_cap = samples["pressure_dapa"] > step.pressure_cap_dapa
    assert above_cap.sum() > 150
    assert not motor[above_cap].any()  # off in the very samples above the cap
    assert not motor[(seconds >= 6.0) & (seconds < 9.0)].any()  # 14 kPa: stays off
    assert motor[(seconds >= 2.05) & (seconds < 5.95)].all()
    assert motor[(seconds >= 9.05) & (seconds < 30.0)].all()  # back in band: resumed
    # 4 s before the cap, 26 s after it: 30 s of contact, done at 35 s.
    assert running[seconds < 34.9].all()
    assert not running[seconds > 35.1].any()

    events = [(e.device_time_ms, e.code, e.payload) for e in link.events()]
    limits = [(t, HardLimitEvent.decode(p)) for t, c, p in events if c == EventCode.HARD_LIMIT]
    assert limits == [(6000, HardLimitEvent(HardLimit.PRESSURE_CAP, 0))]
    assert step_events(events) == [
        (1000, 0, ProgramStepReason.STARTED),
        (9000, 0, ProgramStepReason.RESUMED),
    ]
    finished = [
        (t, ProgramFinishedEvent.decode(p).reason)
        for t, c, p in events
        if c == EventCode.PROGRAM_FINISHED
    ]
    assert finished == [(34990, ProgramEndReason.COMPLETED)]


async def test_no_contact_pauses_and_the_session_cap_ends_the_program(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    step = MassageProgramStep(Zone.FOREHEAD, MassageMode.PULSE, 3, 600, 300, 1500, 1500)
    program = Program(DeviceKind.MASSAGER, ProgramLimits(20, 4300, 30), (step,))
    hand = HandScript(
        [HandSegment(2.0, 6.0, Zone.FOREHEAD, 6.0), HandSegment(14.0, 60.0, Zone.FOREHEAD, 6.0)]
    )
    massager = world.add_massager(hand=hand)
    async with world:
        link = RecordingLink()
        massager.attach_link(link)
        await clock.advance(1.0)
        first = massager.next_sequence
        run_directly(massager, link, program)
        await clock.advance(25.0)
        samples = samples_since(massager, first)

    events = [(e.device_time_ms, e.code, e.payload) for e in link.events()]
    assert step_events(events) == [
        (1000, 0, ProgramStepReason.STARTED),
        (10990, 0, ProgramStepReason.PAUSED),  # 3 s without contact after 8.0 s
        (14000, 0, ProgramStepReason.RESUMED),
    ]
    limits = [HardLimitEvent.decode(p) for _, c, p in events if c == EventCode.HARD_LIMIT]
    assert limits == [HardLimitEvent(HardLimit.SESSION_LENGTH, 0)]
    finished = [
        (t, ProgramFinishedEvent.decode(p).reason)
        for t, c, p in events
        if c == EventCode.PROGRAM_FINISHED
    ]
    assert finished == [(21000, ProgramEndReason.SESSION_CAP)]
    seconds = (first + np.arange(samples.shape[0])) / MASSAGER_RATE_HZ
    motor = (samples["flags"] & MASSAGER_FLAG_MOTOR_ON) != 0
    assert not motor[(seconds > 11.0) & (seconds < 14.0)].any()
    assert not motor[seconds > 21.0].any()
    assert (samples["intensity"][(seconds > 14.0) & (seconds < 20.0)] == 3).all()


async def test_mask_stops_a_channel_at_its_dose_cap_by_itself(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    # Step 1: red 50 + near-infrared 20 mW/cm2 for 300 s; red may deliver 10 J/cm2 (200 s),
    # near-infrared its planned 6 J/cm2 exactly. Step 2 asks for red again: nothing left.
    caps = (1000, 600, 0)
    program = Program(
        DeviceKind.LED_MASK,
        ProgramLimits(1200, 4300, 30),
        (
            LedProgramStep(5000, 2000, 0, 300, 0, *caps),
            LedProgramStep(3000, 0, 0, 60, 0, *caps),
        ),
    )
    mask = world.add_mask(ring_duration_s=2000.0)
    async with world:
        link = RecordingLink()
        mask.attach_link(link)
        await clock.advance(1.0)
        first = mask.next_sequence
        run_directly(mask, link, program)
        await clock.advance(100.0)
        mask.take_off()  # 2 s off the face: within the pause, the light goes on
        await clock.advance(2.0)
        mask.put_on()
        await clock.advance(250.0)
        samples = samples_since(mask, first)

    red = samples["red_centi_mw_cm2"] / 100
    nir = samples["near_infrared_centi_mw_cm2"] / 100
    assert (red > 0).sum() == 200 * MASK_RATE_HZ
    assert (nir > 0).sum() == 300 * MASK_RATE_HZ
    assert np.isclose(red.sum() / MASK_RATE_HZ / 1000, 10.0, rtol=0.01)  # what the mask measured
    assert np.isclose(nir.sum() / MASK_RATE_HZ / 1000, 6.0, rtol=0.01)
    running = (samples["flags"] & LED_MASK_FLAG_PROGRAM_RUNNING) != 0
    assert running.sum() == 300 * MASK_RATE_HZ

    events = [(e.device_time_ms, e.code, e.payload) for e in link.events()]
    limits = [(t, HardLimitEvent.decode(p)) for t, c, p in events if c == EventCode.HARD_LIMIT]
    # Reported once, when it acted; step 2 then finds red used up and the program ends.
    assert limits == [(201000, HardLimitEvent(HardLimit.DOSE_CAP_RED, 0))]
    assert step_events(events) == [
        (1000, 0, ProgramStepReason.STARTED),
        (300900, 1, ProgramStepReason.STEP_DONE),
    ]
    finished = [
        (t, ProgramFinishedEvent.decode(p).reason)
        for t, c, p in events
        if c == EventCode.PROGRAM_FINISHED
    ]
    assert finished == [(301000, ProgramEndReason.HARD_LIMIT)]


async def test_mask_ends_a_step_at_its_temperature_stop_and_waits_for_the_skin_to_cool(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    # Stop at 36 degC: 60 mW/cm2 warms the skin side towards 37 degC (tau 300 s).
    program = Program(
        DeviceKind.LED_MASK,
        ProgramLimits(1800, 3600, 30),
        (
            LedProgramStep(6000, 0, 0, 900, 0, 9000, 0, 0),
            LedProgramStep(1000, 0, 0, 30, 0, 9000, 0, 0),
        ),
    )
    mask = world.add_mask(ring_duration_s=2000.0)
    async with world:
        link = RecordingLink()
        mask.attach_link(link)
        run_directly(mask, link, program)
        await clock.advance(1000.0)
        events = [(e.device_time_ms, e.code, e.payload) for e in link.events()]
        assert [c for _, c, _ in events if c == EventCode.OVER_TEMPERATURE] == [
            EventCode.OVER_TEMPERATURE
        ]
        await clock.advance(400.0)
        events = [(e.device_time_ms, e.code, e.payload) for e in link.events()]

    steps = step_events(events)
    assert [s[1:] for s in steps] == [
        (0, ProgramStepReason.STARTED),
        (1, ProgramStepReason.OVER_TEMPERATURE),
    ]
    (over_ms,) = [t for t, c, _ in events if c == EventCode.OVER_TEMPERATURE]
    assert 300_000 < over_ms < 500_000
    assert steps[1][0] - over_ms > 300_000  # cooled below 34 degC first
    finished = [
        (t, ProgramFinishedEvent.decode(p).reason)
        for t, c, p in events
        if c == EventCode.PROGRAM_FINISHED
    ]
    assert finished == [(steps[1][0] + 30_000 - 100, ProgramEndReason.COMPLETED)]


async def test_link_loss_mid_program_the_device_finishes_and_the_record_is_complete(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, tmp_path: Path
) -> None:
    program = program_from_routine(library_routine("firming", policy), policy)
    hand = follow_program(program, start_s=HAND_START_S)
    massager = world.add_massager(hand=hand)
    outage_s = (240.0, 310.0)  # covers the last step change and the end of the routine
    with SessionStore(tmp_path / "sessions.sqlite3") as store:
        session_id = store.start_session(
            routine_name="firming",
            category="firming",
            device_serial=massager.serial_number,
            device_kind="massager",
            sample_format=SampleFormat.MASSAGER_V1,
            sample_rate_hz=MASSAGER_RATE_HZ,
        )

        async def record(subscription: Subscription[TelemetryItem]) -> None:
            async for item in subscription:
                if isinstance(item, TelemetryBatch):
                    store.append_samples(session_id, item.first_sequence, item.samples)

        async with world:
            clock.start()
            session = await ble_session(world, massager)
            log = EventLog([])
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(record(session.telemetry())),
                loop.create_task(collect_events(session.events(), log)),
            ]
            await session.start()
            await install_program(session, program)
            await start_program(session)
            await clock.sleep(outage_s[0] - clock.now_s())
            world.drop_link(massager, out_of_range_s=outage_s[1] - outage_s[0])
            await wait_finished(log, clock, 600.0)
            await clock.sleep(10.0)  # the backfill completes
            stats = session.stats
            await session.close()
            await asyncio.gather(*tasks)
        sequences, samples = store.telemetry(session_id)

    # The device ended the routine while nobody listened; the host heard it afterwards.
    ((finished_ms, reason),) = log.finished()
    assert reason == ProgramEndReason.COMPLETED
    assert outage_s[0] * 1000 < finished_ms < outage_s[1] * 1000
    (start_ms, _, _), *_ = log.steps()
    expected, finish_ms = expected_steps(program, hand, start_ms, 400.0)
    assert_close_ms(progress(log), expected)
    assert progress(log) == log.steps()  # the hand never left the skin long enough to pause
    assert abs(finished_ms - finish_ms) <= SAMPLE_MS
    assert outage_s[0] * 1000 < log.steps()[-1][0] < outage_s[1] * 1000  # heard late, too
    event_sequences = [e.event_sequence for e in log.events]
    assert event_sequences == sorted(set(event_sequences))  # every event once, in order
    assert stats.reconnects == 1
    assert stats.lost_samples == 0
    assert stats.backfilled_samples >= (outage_s[1] - outage_s[0]) * MASSAGER_RATE_HZ

    # Every sample exactly once, and the program's samples span its start to its end.
    np.testing.assert_array_equal(sequences, np.arange(sequences[0], sequences[-1] + 1))
    running = np.flatnonzero(samples["flags"] & MASSAGER_FLAG_PROGRAM_RUNNING)
    assert running.size == running[-1] - running[0] + 1
    first_ms = int(sequences[running[0]]) * SAMPLE_MS
    last_ms = int(sequences[running[-1]]) * SAMPLE_MS
    assert abs(first_ms - start_ms) <= SAMPLE_MS
    assert last_ms == finished_ms - SAMPLE_MS
    in_contact = samples["flags"][running[0] : running[-1] + 1] & MASSAGER_FLAG_CONTACT != 0
    assert (
        in_contact.sum()
        == sum(
            round(s.contact_time_s * MASSAGER_RATE_HZ)
            for s in program.steps
            if isinstance(s, MassageProgramStep)
        )
        - 1
    )
