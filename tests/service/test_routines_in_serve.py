"""Routines in ``serve`` under the same policy as ``devicebridge run``: temperature, the daily
LED dose, admission, and the summaries a therapist sees."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from devicebridge.app import routine_hand_script
from devicebridge.core.engine import DecisionKind
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import DeviceKindName, parse_routine
from devicebridge.errors import RoutineRefusedError
from devicebridge.run.runner import SAMPLE_FORMAT_OF, RunMode
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
from protocols.telemetry import MASSAGER_FLAG_MOTOR_ON
from simulators import SimulatedMassager
from simulators.devices.mask import SimulatedLedMask

from .conftest import Rig, routine_text, service_rig


def led_routine(red_mw_cm2: float, duration_s: float) -> str:
    return f"""
[routine]
name = "red test"
author = "tests"
version = "1"
device_kind = "led_mask"
category = "general"

[[steps]]
red_mw_cm2 = {red_mw_cm2}
duration_s = {duration_s}
"""


def record_past(
    data_dir: Path, *, category: str, kind: str, days_ago: float, rig: Rig, **summary: object
) -> None:
    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        session_id = store.start_session(
            routine_name="earlier",
            category=category,
            device_serial="PAST",
            device_kind=kind,
            sample_format=SAMPLE_FORMAT_OF[DeviceKindName(kind)],
            sample_rate_hz=100.0,
            started_at=rig.service.now() - timedelta(days=days_ago),
        )
        store.finish_session(
            session_id, status="completed", end_reason=None, summary={"completion": 1.0, **summary}
        )


async def ready_worker(rig: Rig) -> str:
    await rig.start()
    worker = next(iter(rig.service.workers.values()))
    await rig.wait(lambda: worker.batcher is not None)
    return worker.serial


@pytest.mark.parametrize("mode", [RunMode.HOST, RunMode.AUTO])
async def test_over_temperature_on_a_massager_in_serve_stops_the_motor(
    tmp_path: Path, mode: RunMode
) -> None:
    policy = default_policy()
    routine = parse_routine(routine_text("firming").decode(), policy)
    async with service_rig(tmp_path, run_mode=mode) as rig:
        serial = await ready_worker(rig)
        massager = rig.devices[0]
        assert isinstance(massager, SimulatedMassager)
        massager.hand = routine_hand_script(routine, policy, start_s=massager.uptime_s + 1.0)
        runner = await rig.service.start_routine(serial, routine)
        await rig.wait(lambda: runner.engine is not None and runner.samples_recorded > 1000)
        massager.skin_baseline_c = 46.0  # the head heats the skin above the 43 °C stop
        worker = rig.service.workers[serial]
        result = await worker.wait_routine()
    assert result is not None
    stops = [d for d in result.decisions if d.kind is DecisionKind.STOP_STEP]
    assert stops
    assert stops[0].reason == "over_temperature"
    assert "temperature.stop_c = 43" in (stops[0].rule or "")
    # After each temperature stop the motor is off (a tenth of a second for STOP_ALL to
    # take effect) until the engine resumes once the skin has cooled below the warn level.
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        sequences, samples = store.telemetry(result.session_id or 0)
    motor = (samples["flags"] & MASSAGER_FLAG_MOTOR_ON) != 0
    resumes = [d.sequence for d in result.decisions if d.kind is DecisionKind.RESUME]
    for stop in stops:
        assert stop.sequence is not None
        resumed = min((r for r in resumes if r is not None and r > stop.sequence), default=None)
        held = sequences >= stop.sequence + 10
        if resumed is not None:
            held &= sequences < resumed
        assert held.any()
        assert not np.any(motor[held]), stop
    assert result.status in ("stopped", "completed")


async def test_the_daily_led_cap_holds_in_serve(tmp_path: Path) -> None:
    policy = default_policy()
    routine = parse_routine(led_routine(20.0, 500), policy)
    async with service_rig(tmp_path, massagers=0, masks=1, run_mode=RunMode.HOST) as rig:
        # 50 of the 60 J/cm² daily red dose three hours ago: 10 J/cm² remain.
        record_past(
            tmp_path,
            category="general",
            kind="led_mask",
            days_ago=3 / 24,
            rig=rig,
            dose_j_cm2={"red": 50.0, "near_infrared": 0.0, "blue": 0.0},
        )
        serial = await ready_worker(rig)
        mask = rig.devices[0]
        assert isinstance(mask, SimulatedLedMask)

        def over_deliver(
            times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]
        ) -> npt.NDArray[np.void]:
            # A mask that delivers a quarter more than asked.
            samples["red_centi_mw_cm2"] = np.round(samples["red_centi_mw_cm2"] * 1.25)
            return samples

        mask.sample_filters.append(over_deliver)
        runner = await rig.service.start_routine(serial, routine)
        result = await rig.service.workers[serial].wait_routine()
    assert result is not None
    assert runner.engine is not None
    assert runner.engine.dose_allowed_j_cm2["red"] == pytest.approx(10.0)
    stop = next(d for d in result.decisions if d.kind is DecisionKind.STOP_STEP)
    assert stop.reason == "dose_cap"
    assert result.summary["dose_j_cm2"]["red"] == pytest.approx(10.0, abs=0.01)


async def test_a_third_firming_in_seven_days_is_refused_in_serve(tmp_path: Path) -> None:
    policy = default_policy()
    routine = parse_routine(routine_text("firming").decode(), policy)
    async with service_rig(tmp_path) as rig:
        for days_ago in (5.0, 1.0):
            record_past(tmp_path, category="firming", kind="massager", days_ago=days_ago, rig=rig)
        serial = await ready_worker(rig)
        massager = rig.devices[0]
        commands_before = massager.commands_received
        with pytest.raises(RoutineRefusedError) as refused:
            await rig.service.start_routine(serial, routine)
        assert rig.service.workers[serial].runner is None
        await rig.clock.sleep(1.0)
        assert massager.commands_received == commands_before  # nothing reached the device
    assert "frequency.firming.max_sessions = 2" in str(refused.value)
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        record = store.session(refused.value.session_id or 0)
    assert record.status == "refused"


@pytest.mark.parametrize("together", [True, False], ids=["together", "one-after-another"])
async def test_firming_started_on_three_massagers_at_once_is_admitted_twice(
    tmp_path: Path, together: bool
) -> None:
    """The frequency rule counts a run from its admission, not from the moment its record
    is stored: three starts in the same instant on three massagers of one bridge (one
    person's history), concurrent or each awaited, are two firming sessions admitted and
    one refused."""
    policy = default_policy()
    routine = parse_routine(routine_text("firming").decode(), policy)
    async with service_rig(tmp_path, massagers=3) as rig:
        await rig.start()
        workers = list(rig.service.workers.values())
        await rig.wait(lambda: all(w.batcher is not None for w in workers))
        starts = [rig.service.start_routine(w.serial, routine) for w in workers]
        if together:
            started = await asyncio.gather(*starts, return_exceptions=True)
        else:
            started = []
            for start in starts:
                try:
                    started.append(await start)
                except RoutineRefusedError as refusal:
                    started.append(refusal)
        refused = [r for r in started if isinstance(r, RoutineRefusedError)]
        assert len(refused) == 1, started
        assert [r for r in started if isinstance(r, BaseException)] == refused
        assert "frequency.firming.max_sessions = 2" in str(refused[0])
        assert sum(w.runner is not None for w in workers) == 2


async def test_light_on_a_second_mask_counts_what_the_first_still_plans(tmp_path: Path) -> None:
    """While a mask's session runs, its stored record holds only the light delivered so
    far: a light routine started on another mask of the same bridge meanwhile counts the
    first run's whole planned dose, so the two together stay within the daily cap."""
    policy = default_policy()
    # 50 mW/cm² for 600 s: 30 of the 60 J/cm² of red a day
    routine = parse_routine(led_routine(50.0, 600), policy)
    async with service_rig(tmp_path, massagers=0, masks=3) as rig:
        await rig.start()
        workers = list(rig.service.workers.values())
        await rig.wait(lambda: all(w.batcher is not None for w in workers))
        first = await rig.service.start_routine(workers[0].serial, routine)
        await rig.wait(lambda: first.session_id is not None and first.samples_recorded >= 500)
        second = await rig.service.start_routine(workers[1].serial, routine)
        assert second.admission is not None
        assert second.admission.dose_today_j_cm2["red"] == pytest.approx(30.0)
        with pytest.raises(RoutineRefusedError) as refused:
            await rig.service.start_routine(workers[2].serial, routine)
    assert "red light: 60.0 J/cm² already" in str(refused.value)
