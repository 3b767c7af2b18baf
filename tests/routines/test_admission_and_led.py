"""Admission before anything reaches a device; LED dose caps and a hot mask, end to end."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import numpy.typing as npt
import pytest

from devicebridge.app import routine_hand_script
from devicebridge.core.engine import DecisionKind
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import Routine
from devicebridge.errors import RoutineRefusedError
from devicebridge.run.runner import SAMPLE_FORMAT_OF, RoutineRunner
from devicebridge.storage.sessions import SessionStatus, SessionStore
from protocols import Opcode
from simulators import SimulatedWorld, VirtualClock
from simulators.devices import mask as mask_module

from .conftest import NOW, WriteLog, connect, routine_from, runner_for

FIRMING_FILE = "devicebridge/data/routines/firming.toml"


def firming(policy: SafetyPolicy) -> Routine:
    from pathlib import Path

    return routine_from(Path(FIRMING_FILE).read_text(), policy)


def record_past(
    store: SessionStore,
    routine: Routine,
    when_days_ago: float,
    status: SessionStatus = "completed",
    **summary: object,
) -> None:
    session_id = store.start_session(
        routine_name=routine.name,
        category=routine.category,
        device_serial="FM-PAST",
        device_kind=routine.device_kind.value,
        sample_format=SAMPLE_FORMAT_OF[routine.device_kind],
        sample_rate_hz=100.0,
        started_at=NOW - timedelta(days=when_days_ago),
    )
    store.finish_session(session_id, status=status, end_reason=None, summary=summary)


async def test_full_firming_routine_completes_and_is_stored(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    routine = firming(policy)
    massager = world.add_massager()
    async with world:
        clock.start()
        session = await connect(world, massager)
        await session.start()
        # The simulated hand follows the routine from one second from now.
        massager.hand = routine_hand_script(routine, policy, start_s=massager.uptime_s + 1.0)
        result = await runner_for(session, routine, policy, store).run(max_duration_s=600)
        await session.close()

    assert result.status == "completed", result
    record = store.session(result.session_id or 0)
    assert record.status == "completed"
    assert record.routine_name == routine.name
    assert record.summary["completion"] == 1.0
    assert record.summary["out_of_band_events"] == 0
    assert record.summary["in_band_fraction"] == pytest.approx(1.0)
    assert record.summary["contact_s_by_zone"] == {
        "cheek_left": 60.0,
        "cheek_right": 60.0,
        "jawline_left": 60.0,
        "jawline_right": 60.0,
        "chin": 45.0,
    }
    sequences, _ = store.telemetry(record.id)
    assert np.array_equal(sequences, np.arange(sequences[0], sequences[0] + sequences.size))
    assert [d.kind for d in store.decisions(record.id)].count("next_step") == 4


async def test_third_firming_in_seven_days_is_refused_with_the_next_allowed_time(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    routine = firming(policy)
    record_past(store, routine, 5.0)
    record_past(store, routine, 1.0)
    massager = world.add_massager()
    async with world:
        clock.start()
        session = await connect(world, massager)
        runner = runner_for(session, routine, policy, store)
        with pytest.raises(RoutineRefusedError) as refused:
            await runner.run()
        await session.close()

    allowed = NOW - timedelta(days=5) + timedelta(days=7)
    assert refused.value.allowed_from == allowed
    assert allowed.strftime("%Y-%m-%d %H:%M") in str(refused.value)
    assert "frequency.firming.max_sessions = 2" in str(refused.value)
    assert massager.commands_received == 0  # never even connected
    record = store.session(refused.value.session_id or 0)
    assert record.status == "refused"
    # A refused attempt is not a session: it does not count towards the next window.
    assert sum(1 for r in store.sessions() if r.status == "completed") == 2


async def test_massage_of_a_filler_zone_within_14_days_is_refused(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    store.add_treatment("filler", NOW - timedelta(days=10), ["cheek", "nasolabial"])
    massager = world.add_massager()
    async with world:
        clock.start()
        session = await connect(world, massager)
        with pytest.raises(RoutineRefusedError) as refused:
            await runner_for(session, firming(policy), policy, store).run()
        await session.close()
    text = str(refused.value)
    assert "filler on cheek" in text
    assert (NOW + timedelta(days=4)).strftime("%Y-%m-%d %H:%M") in text
    assert "cooldowns.filler.massage_block_h = 336" in text
    assert massager.commands_received == 0
    # Fifteen days later the same routine is admitted.
    later = RoutineRunner(
        session, firming(policy), policy, store=store, now=lambda: NOW + timedelta(days=5)
    )
    assert (await later.admit()).allowed


LED_ROUTINE = """
[routine]
name = "red test"
author = "tests"
version = "1"
device_kind = "led_mask"
category = "general"

[[steps]]
red_mw_cm2 = {red}
near_infrared_mw_cm2 = {nir}
duration_s = {duration}
"""


async def test_led_routine_stops_at_the_dose_cap_left_for_the_day(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    routine = routine_from(LED_ROUTINE.format(red=20.0, nir=0.0, duration=500), policy)
    # 50 of the 60 J/cm² daily red dose were used three hours ago; 10 J/cm² remain, exactly
    # what the routine plans, so admission lets it run.
    record_past(store, routine, 3 / 24, dose_j_cm2={"red": 50.0, "near_infrared": 0.0})
    mask = world.add_mask()

    # A miscalibrated mask that delivers a quarter more than asked: the host integrates what
    # the mask reports, so the step must stop at the cap before its planned end.
    def over_deliver(
        times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]
    ) -> npt.NDArray[np.void]:
        samples["red_centi_mw_cm2"] = np.round(samples["red_centi_mw_cm2"] * 1.25)
        return samples

    mask.sample_filters.append(over_deliver)
    async with world:
        clock.start()
        session = await connect(world, mask)
        log = WriteLog(session, clock)
        runner = runner_for(session, routine, policy, store)
        result = await runner.run(max_duration_s=700)
        await clock.sleep(0.5)
        _, tail = mask.ring.range(mask.next_sequence - 3, 3)
        await session.close()

    assert mask.treatment is None
    assert tail["red_centi_mw_cm2"].max() == 0  # dark after the stop
    assert runner.engine is not None
    assert runner.engine.dose_allowed_j_cm2["red"] == pytest.approx(10.0)
    stop_step = next(d for d in result.decisions if d.kind is DecisionKind.STOP_STEP)
    assert stop_step.reason == "dose_cap"
    assert 390 <= stop_step.at_s <= 410  # 10 J/cm² at 25 mW/cm² takes 400 s
    assert result.status == "stopped"
    assert result.summary["dose_j_cm2"]["red"] == pytest.approx(10.0, abs=0.01)
    stops = log.times_of(Opcode.STOP_ALL)
    assert stops
    assert stops[0] >= stop_step.at_s


async def test_hot_mask_reaching_the_stop_temperature_ends_the_step(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A mask with poor heat sinking: its skin side warms 0.5 °C per mW/cm² (model: 0.06).
    monkeypatch.setattr(mask_module, "THERMAL_GAIN_C_PER_MW_CM2", 0.5)
    routine = routine_from(LED_ROUTINE.format(red=40.0, nir=20.0, duration=600), policy)
    mask = world.add_mask()
    async with world:
        clock.start()
        session = await connect(world, mask)
        log = WriteLog(session, clock)
        result = await runner_for(session, routine, policy, store).run(max_duration_s=700)
        await session.close()

    kinds = [(d.kind, d.reason) for d in result.decisions]
    assert kinds[:2] == [
        (DecisionKind.GUIDANCE, "step_start"),
        (DecisionKind.LOWER_INTENSITY, "temperature_warn"),
    ]
    lowered = result.decisions[1]
    assert lowered.irradiance_mw_cm2 == {"red": 20.0, "near_infrared": 10.0, "blue": 0.0}
    stop = next(d for d in result.decisions if d.kind is DecisionKind.STOP_STEP)
    assert stop.reason == "over_temperature"
    assert "temperature.stop_c = 43" in (stop.rule or "")
    assert lowered.at_s < stop.at_s < 600
    assert result.status == "stopped"
    # The lowered irradiance went to the mask (STOP_LED, START_LED), and STOP_ALL at the stop.
    assert len(log.times_of(Opcode.START_LED)) == 2
    assert any(t >= stop.at_s for t in log.times_of(Opcode.STOP_ALL))
    _, samples = store.telemetry(result.session_id or 0)
    temperatures = samples["skin_temperature_centi_c"] / 100
    assert temperatures.max() >= 43.0


async def test_a_session_cancelled_before_it_counts_leaves_the_week_open(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    routine = firming(policy)
    record_past(store, routine, 5.0)  # one firming session this week (no completion: counts)
    massager = world.add_massager()  # nobody holds it: no contact, nothing done
    async with world:
        clock.start()
        session = await connect(world, massager)
        cancelled = await runner_for(session, routine, policy, store).run(max_duration_s=20)
        await session.close()
    assert cancelled.status == "stopped"
    assert store.session(cancelled.session_id or 0).summary["completion"] == 0.0
    # Twenty seconds at 0 % is not a session: the second of the week is still allowed.
    later = RoutineRunner(
        session, routine, policy, store=store, now=lambda: NOW + timedelta(hours=1)
    )
    assert (await later.admit()).allowed
    # A session that got past half of its planned contact counts.
    record_past(store, routine, 1.0, "stopped", completion=0.6)
    again = RoutineRunner(
        session, routine, policy, store=store, now=lambda: NOW + timedelta(hours=2)
    )
    with pytest.raises(RoutineRefusedError, match=r"frequency\.firming\.max_sessions = 2"):
        await again.admit()
