"""Scripted hands through the whole stack: the decisions, their times and the device's motor."""

from __future__ import annotations

import pytest

from devicebridge.core.engine import DecisionKind
from devicebridge.core.policy import SafetyPolicy
from devicebridge.run.runner import RunMode
from devicebridge.storage.sessions import SessionStore
from protocols import Opcode, Zone
from simulators import HandScript, HandSegment, SimulatedWorld, VirtualClock

from .conftest import (
    WriteLog,
    connect,
    massage_routine,
    massage_step,
    motor_on,
    routine_from,
    runner_for,
)

MAX_RUN_S = 120.0


def seq(t_s: float) -> int:
    """The first sample at or after ``t_s`` seconds since boot (100 Hz)."""
    return int(-(-round(t_s * 1000) // 10))


@pytest.mark.parametrize("mode", [RunMode.HOST, RunMode.DEVICE])
async def test_too_hard_on_the_eye_area_pauses_with_stop_all_then_resumes(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    mode: RunMode,
) -> None:
    """In device mode the program also runs on the device; the host's STOP_ALL ends it and
    the host drives the rest."""
    hand = HandScript(
        [
            HandSegment(2.005, 2.0, Zone.EYE_AREA_LEFT, 1.5),
            HandSegment(4.005, 0.5, Zone.EYE_AREA_LEFT, 6.0),  # above the 4 kPa eye-area cap
            HandSegment(4.505, 6.0, Zone.EYE_AREA_LEFT, 1.5),
            HandSegment(11.505, 5.0, Zone.CHEEK_LEFT, 7.0),
        ]
    )
    massager = world.add_massager(hand=hand)
    routine = routine_from(
        massage_routine(
            massage_step("eye_area_left", 8, 0.5, 2.5, intensity=3)
            + massage_step("cheek_left", 5, 4.0, 12.0)
        ),
        policy,
    )
    async with world:
        clock.start()
        session = await connect(world, massager)
        log = WriteLog(session, clock)
        runner = runner_for(session, routine, policy, store, mode=mode)
        result = await runner.run(max_duration_s=MAX_RUN_S)
        await session.close()

    assert runner.mode is mode
    assert result.status == "completed", result
    kinds = [(d.kind, d.reason, d.sequence) for d in result.decisions]
    assert kinds == [
        (DecisionKind.GUIDANCE, "step_start", None),
        (DecisionKind.PAUSE, "pressure_cap", seq(4.005)),
        (DecisionKind.RESUME, "pressure_cap", seq(4.505)),
        (DecisionKind.NEXT_STEP, "step_done", seq(4.505) + 600 - 1),
        (DecisionKind.COMPLETE, "complete", seq(11.505) + 500 - 1),
    ]
    pause = result.decisions[1]
    assert "zones.eye_area.cap_kpa = 4" in (pause.rule or "")
    # STOP_ALL written within one batch interval of the sample that crossed the cap.
    stops = log.times_of(Opcode.STOP_ALL)
    assert any(4.01 <= t <= 4.11 + 1e-9 for t in stops), stops
    # The device's own samples show the motor off from then until the resume.
    sequences, samples = store.telemetry(result.session_id or 0)
    by_seq = dict(zip(sequences.tolist(), motor_on(samples).tolist(), strict=True))
    assert all(by_seq[s] for s in range(seq(3.0), seq(4.0)))
    assert not any(by_seq[s] for s in range(seq(4.12), seq(4.505)))
    assert all(by_seq[s] for s in range(seq(4.62), seq(10.0)))
    record = store.session(result.session_id or 0)
    assert record.status == "completed"
    assert record.summary["cap_events"] == 1
    assert record.summary["contact_s_by_zone"]["cheek_left"] == 5.0


async def test_drifting_out_of_contact_pauses_after_3_s_and_resumes_on_contact(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    hand = HandScript(
        [
            HandSegment(2.005, 4.0, Zone.CHEEK_LEFT, 7.0),
            # Off the skin from 6.005 s to 10.005 s: longer than the 3 s no-contact pause.
            HandSegment(10.005, 7.0, Zone.CHEEK_LEFT, 7.0),
        ]
    )
    massager = world.add_massager(hand=hand)
    routine = routine_from(massage_routine(massage_step("cheek_left", 10, 4.0, 12.0)), policy)
    async with world:
        clock.start()
        session = await connect(world, massager)
        log = WriteLog(session, clock)
        result = await runner_for(session, routine, policy, store).run(max_duration_s=MAX_RUN_S)
        await session.close()

    assert result.status == "completed"
    kinds = [(d.kind, d.reason, d.sequence) for d in result.decisions]
    assert kinds == [
        (DecisionKind.GUIDANCE, "step_start", None),
        (DecisionKind.PAUSE, "no_contact", seq(6.005) + 300 - 1),
        (DecisionKind.RESUME, "no_contact", seq(10.005)),
        (DecisionKind.COMPLETE, "complete", seq(10.005) + 600 - 1),
    ]
    assert "session.no_contact_pause_s = 3" in (result.decisions[1].rule or "")
    assert any(9.0 <= t <= 9.1 + 1e-9 for t in log.times_of(Opcode.STOP_ALL))
    # The motor restarts after the resume (SET_MODE, SET_INTENSITY within one batch).
    assert any(10.0 <= t <= 10.2 for t in log.times_of(Opcode.SET_INTENSITY))
    sequences, samples = store.telemetry(result.session_id or 0)
    by_seq = dict(zip(sequences.tolist(), motor_on(samples).tolist(), strict=True))
    assert not any(by_seq[s] for s in range(seq(9.11), seq(10.0)))
    assert all(by_seq[s] for s in range(seq(10.2), seq(15.0)))


async def test_staying_too_long_on_one_zone_pauses_until_the_head_moves(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    # Two steps on the same zone: each within the 60 s pass cap, together past it.
    hand = HandScript(
        [
            HandSegment(2.005, 65.0, Zone.CHEEK_LEFT, 7.0),
            HandSegment(67.505, 2.0, Zone.CHEEK_RIGHT, 7.0),  # the head moves: resume
            HandSegment(70.005, 11.0, Zone.CHEEK_LEFT, 7.0),  # a new pass on the cheek
        ]
    )
    massager = world.add_massager(hand=hand)
    routine = routine_from(
        massage_routine(
            massage_step("cheek_left", 40, 4.0, 12.0) + massage_step("cheek_left", 30, 4.0, 12.0)
        ),
        policy,
    )
    async with world:
        clock.start()
        session = await connect(world, massager)
        log = WriteLog(session, clock)
        result = await runner_for(session, routine, policy, store).run(max_duration_s=MAX_RUN_S)
        await session.close()

    assert result.status == "completed"
    kinds = [(d.kind, d.reason, d.sequence) for d in result.decisions]
    first = seq(2.005)
    assert kinds == [
        (DecisionKind.GUIDANCE, "step_start", None),
        (DecisionKind.NEXT_STEP, "step_done", first + 4000 - 1),
        (DecisionKind.PAUSE, "zone_time", first + 6000),
        (DecisionKind.RESUME, "zone_time", seq(67.505)),
        (DecisionKind.GUIDANCE, "wrong_zone", seq(67.505)),
        (DecisionKind.COMPLETE, "complete", seq(70.005) + 1000 - 1),
    ]
    assert "zones.cheek.pass_cap_s = 60" in (result.decisions[2].rule or "")
    assert any(62.01 <= t <= 62.11 + 1e-9 for t in log.times_of(Opcode.STOP_ALL))
    sequences, samples = store.telemetry(result.session_id or 0)
    by_seq = dict(zip(sequences.tolist(), motor_on(samples).tolist(), strict=True))
    assert all(by_seq[s] for s in range(seq(30.0), seq(62.0)))
    assert not any(by_seq[s] for s in range(seq(62.12), seq(67.5)))
    summary = store.session(result.session_id or 0).summary
    # The sample that crossed the cap counts as contact (the pause acts on the next one).
    assert summary["contact_s_by_zone"] == {"cheek_left": 70.01, "cheek_right": 2.0}


async def test_a_resume_and_a_pause_in_one_batch_leave_the_motor_off(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    # Back on the skin after the no-contact pause just under the forehead's 15 kPa cap, and
    # above it on the next sample: the engine resumes and pauses again within one batch.
    # Found by tests/routines/test_policy_properties.py.
    hand = HandScript(
        [
            HandSegment(4.005, 0.01, Zone.FOREHEAD, 14.5),
            HandSegment(4.015, 3.0, Zone.FOREHEAD, 20.0),
        ],
        noise_floor_kpa=0.0,
        noise_fraction=0.0,
    )
    massager = world.add_massager(hand=hand)
    routine = routine_from(massage_routine(massage_step("forehead", 5, 4.0, 12.0)), policy)
    async with world:
        clock.start()
        session = await connect(world, massager)
        result = await runner_for(session, routine, policy, store).run(max_duration_s=8.0)
        await session.close()

    kinds = [(d.kind, d.reason, d.sequence) for d in result.decisions]
    assert kinds[1:4] == [
        (DecisionKind.PAUSE, "no_contact", seq(3.0) - 1),
        (DecisionKind.RESUME, "no_contact", seq(4.005)),
        (DecisionKind.PAUSE, "pressure_cap", seq(4.015)),
    ]
    sequences, samples = store.telemetry(result.session_id or 0)
    by_seq = dict(zip(sequences.tolist(), motor_on(samples).tolist(), strict=True))
    # Paused from then on (the hand stays above the cap): the motor stays off.
    assert not any(by_seq[s] for s in range(seq(4.2), seq(7.0)))
