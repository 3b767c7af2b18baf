"""Routines by time on a simulated FOREO, through the real bleak API and the one runner.

The FOREO reports nothing: guidance runs on the host's clock, the zone's intensity cap and
the time caps are the only limits, and the device is stopped at the end, after a link loss
and on Ctrl-C. The session is stored and reported with the checks that applied.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from bleak.exc import BleakGATTProtocolError, BleakGATTProtocolErrorCode

from devicebridge.core.catalogue import DeviceCatalogue
from devicebridge.core.engine import Decision, DecisionKind
from devicebridge.core.policy import SafetyPolicy, default_policy_text, parse_policy
from devicebridge.core.routine import parse_routine
from devicebridge.device.transport.ble import BleBackends
from devicebridge.errors import DeviceUnsupportedError
from devicebridge.reporting.report import load_report, summary_lines
from devicebridge.run.runner import UNWATCHED_STOP_WAIT_S
from devicebridge.run.view import RunnerState
from devicebridge.storage.sessions import SessionStore
from simulators import SimulatedWorld, VirtualClock

from .conftest import foreo_session, runner, timed_routine, timed_step

# A zone change or a write lands within this much virtual time of when it falls due (the
# simulated devices' loops tick every 0.1 s; the host's command round trips take no time).
LATENCY_S = 0.25
MAX_RUN_S = 600.0


async def test_guidance_by_time_cues_caps_and_stops_at_the_end(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    luna = world.add_foreo(name="LUNA 3")
    routine = timed_routine(
        policy,
        timed_step("cheek_left", 40, 5) + timed_step("eye_area_left", 20, 3),
    )
    seen: list[tuple[float, Decision]] = []
    states: list[RunnerState] = []
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        run = runner(
            session,
            routine,
            policy,
            store,
            on_decision=lambda d: seen.append((clock.now_s(), d)),
            on_update=states.append,
        )
        result = await run.run(max_duration_s=MAX_RUN_S)
        ended_s = clock.now_s()
        stopped = luna.speed
        await session.close()

    assert result.status == "completed", result
    decisions = [(d.kind, d.reason, d.at_s) for d in result.decisions]
    assert decisions == [
        (DecisionKind.GUIDANCE, "step_start", 0.0),
        (DecisionKind.GUIDANCE, "move_cue", 15.0),
        (DecisionKind.GUIDANCE, "move_cue", 30.0),
        (DecisionKind.NEXT_STEP, "step_done", 40.0),  # the cue at the zone change
        (DecisionKind.GUIDANCE, "move_cue", 55.0),
        (DecisionKind.COMPLETE, "complete", 60.0),
    ]
    # Each guidance reached the user at its virtual time, not a tick later.
    start_s = seen[0][0]
    assert [round(t - start_s, 9) for t, _ in seen] == [d.at_s for d in result.decisions]
    assert "cheek_left for 40 s" in result.decisions[0].message
    assert "25 s left here" in result.decisions[1].message
    assert "eye_area_left for 20 s" in result.decisions[3].message

    # The motor: the cheek's intensity (within its cap of 8), the eye area's (cap 3) from
    # the zone change, and stopped at the end; every packet in Buttplug's format, mode 0.
    assert luna.malformed_writes == 0
    assert {w.data[:2] for w in luna.writes} == {b"\x01\x00"}
    assert luna.max_speed_between(start_s, start_s + 40.0) == 5
    assert luna.max_speed_between(start_s + 40.0 + LATENCY_S, start_s + 60.0) == 3
    changes = [(round(t - start_s, 1), speed) for t, speed in luna.speed_log if t >= start_s]
    assert [speed for _, speed in changes[:3]] == [5, 3, 0]
    assert 40.0 <= changes[1][0] <= 40.0 + LATENCY_S
    assert 60.0 <= changes[2][0] <= 60.0 + LATENCY_S
    assert stopped == 0
    assert ended_s - start_s <= 60.0 + 2 * LATENCY_S

    # The live view counts time down and shows no pressure gauge.
    assert any(s.step == 1 and 24 <= s.step_remaining_s <= 26 for s in states)
    assert all(s.band_kpa is None and s.by_time for s in states)
    assert states[-1].not_measured == ("pressure", "contact", "skin_temperature")

    # Stored and reported like any session, with the checks that applied.
    assert result.session_id is not None
    record = store.session(result.session_id)
    assert record.status == "completed"
    assert record.device_serial == f"foreo@{luna.address}"
    assert record.sample_rate_hz == 0.0
    checks = record.summary["checks"]
    assert checks["pressure"] == "not measured by this device"
    assert checks["contact"] == "not measured by this device"
    assert checks["time"].startswith("by the host clock")
    assert record.summary["time_s_by_zone"] == {"cheek_left": 40.0, "eye_area_left": 20.0}
    assert record.summary["completion"] == 1.0
    lines = summary_lines(load_report(store, result.session_id, policy))
    assert "pressure: not measured by this device" in lines
    assert "time in each zone (by the clock):" in lines
    assert "  cheek_left: 40.0 s" in lines


async def test_a_step_above_the_zones_intensity_cap_runs_at_the_cap(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    """A routine written under a looser policy (eye area up to 8) runs under this one
    (eye area cap 3): the device never gets more than the cap."""
    looser = parse_policy(
        re.sub(
            r"(\[zones\.eye_area\]\n(?:.*\n)*?intensity_cap = \{ value = )3,",
            r"\g<1>8,",
            default_policy_text(),
        ),
        label="looser.toml",
    )
    luna = world.add_foreo(name="LUNA 4")
    routine = timed_routine(looser, timed_step("eye_area_right", 20, 7))
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        result = await runner(session, routine, policy, store).run(max_duration_s=MAX_RUN_S)
        await session.close()

    assert result.status == "completed"
    lowered = [d for d in result.decisions if d.kind is DecisionKind.LOWER_INTENSITY]
    assert len(lowered) == 1
    assert "zones.eye_area.intensity_cap = 3" in (lowered[0].rule or "")
    assert max(speed for _, speed in luna.speed_log) == 3


async def test_time_caps_by_the_host_clock_stop_the_step_and_the_session(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    """A routine written under the default policy, run under a stricter one: the cheek's
    session cap (25 s per side) cuts its step, the session cap (35 s) ends the session."""
    strict = parse_policy(
        re.sub(
            r"(\[zones\.cheek\]\n(?:.*\n)*?session_cap_s = \{ value = )300,",
            r"\g<1>25,",
            default_policy_text(),
        ).replace("massage_length_cap_s = { value = 1200,", "massage_length_cap_s = { value = 35,"),
        label="strict.toml",
    )
    luna = world.add_foreo(name="UFO 2")
    routine = timed_routine(policy, timed_step("cheek_left", 40, 4) + timed_step("forehead", 30, 4))
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        start_s = clock.now_s()
        result = await runner(session, routine, strict, store).run(max_duration_s=MAX_RUN_S)
        stopped = luna.speed
        await session.close()

    assert result.status == "stopped"
    assert result.end_reason == "session_cap"
    kinds = [(d.kind, d.reason, d.at_s) for d in result.decisions]
    assert (DecisionKind.STOP_STEP, "zone_time_cap", 25.0) in kinds
    assert (DecisionKind.NEXT_STEP, "step_done", 25.0) in kinds
    assert kinds[-1] == (DecisionKind.STOP, "session_cap", 35.0)
    stop_step = next(d for d in result.decisions if d.kind is DecisionKind.STOP_STEP)
    assert "zones.cheek.session_cap_s = 25" in (stop_step.rule or "")
    assert {w.data[:2] for w in luna.writes} == {b"\x01\x01"}  # UFO names: mode 1
    # Off at the zone cap (then on for the forehead), off for good at the session cap.
    off = [t - start_s for t, speed in luna.speed_log if speed == 0 and t > start_s]
    assert any(25.0 <= t <= 25.0 + LATENCY_S for t in off)
    assert any(35.0 <= t <= 35.0 + LATENCY_S for t in off)
    assert stopped == 0


async def test_a_link_loss_ends_the_session_and_the_device_is_stopped_when_back(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    luna = world.add_foreo(name="LUNA 3")
    routine = timed_routine(policy, timed_step("forehead", 60, 6))
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        run = runner(session, routine, policy, store)
        task = asyncio.ensure_future(run.run(max_duration_s=MAX_RUN_S))
        await clock.sleep(20.0)
        assert luna.speed == 6
        dropped_s = clock.now_s()
        world.drop_link(luna, out_of_range_s=3.0)
        await clock.sleep(0.5)
        # The link is down: the device keeps running (the simulator's worst case).
        assert luna.speed == 6
        result = await task
        back_s = clock.now_s()
        stopped = luna.speed
        await session.close()

    assert result.status == "interrupted"
    assert result.end_reason is not None
    assert "link was lost" in result.end_reason
    assert "stopped when it came back" in result.end_reason
    assert result.decisions[-1].kind is DecisionKind.STOP
    assert result.decisions[-1].reason == "link_lost"
    assert stopped == 0
    stopped_at = next(t for t, speed in luna.speed_log if t > dropped_s and speed == 0)
    assert dropped_s + 3.0 <= stopped_at <= back_s
    record = store.session(result.session_id or 0)
    assert record.status == "interrupted"
    assert record.summary["checks"]["pressure"] == "not measured by this device"


async def test_a_device_that_never_comes_back_is_reported_as_not_stopped(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    luna = world.add_foreo(name="LUNA 3")
    routine = timed_routine(policy, timed_step("forehead", 60, 6))
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        run = runner(session, routine, policy, store)
        task = asyncio.ensure_future(run.run(max_duration_s=MAX_RUN_S))
        await clock.sleep(10.0)
        lost_s = clock.now_s()
        world.set_in_range(luna, False)
        result = await task
        waited_s = clock.now_s() - lost_s
        still_running = luna.speed  # before the world powers it off
        await session.close()

    assert result.status == "interrupted"
    assert "could not be told to stop: switch it off by hand" in (result.end_reason or "")
    assert UNWATCHED_STOP_WAIT_S <= waited_s <= UNWATCHED_STOP_WAIT_S + 1.0
    assert still_running == 6  # honestly reported: nothing could reach it


async def test_ctrl_c_stops_the_device(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    luna = world.add_foreo(name="LUNA play smart 2")
    routine = timed_routine(policy, timed_step("chin", 60, 4))
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        run = runner(session, routine, policy, store)
        task = asyncio.ensure_future(run.run(max_duration_s=MAX_RUN_S))
        await clock.sleep(12.0)
        assert luna.speed == 4
        task.cancel()  # what Ctrl-C does to `devicebridge run`
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped = luna.speed
        await session.close()

    assert stopped == 0
    assert luna.writes[-1].data == bytes([0x01, 0x03, 0x00])  # "smart 2" names: mode 3
    record = store.session(run.session_id or 0)
    assert record.status == "stopped"
    assert record.end_reason == "cancelled by the user"


async def test_a_routine_with_a_pressure_band_is_refused_with_the_reason(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    luna = world.add_foreo(name="LUNA 3")
    text = """[routine]
name = "firm"
author = "tests"
version = "1"
device_kind = "massager"

[[steps]]
zone = "cheek_left"
contact_time_s = 30
intensity = 4
pressure_kpa = { min = 4.0, max = 12.0 }

[[steps]]
zone = "chin"
timing = "time"
duration_s = 20
intensity = 4
"""
    routine = parse_routine(text, policy, label="firm.toml")
    async with world:
        clock.start()
        session = await foreo_session(world, luna, catalogue)
        with pytest.raises(DeviceUnsupportedError) as refused:
            await runner(session, routine, policy, store).run(max_duration_s=MAX_RUN_S)
        await session.close()

    message = str(refused.value)
    assert "LUNA 3 cannot run 'firm'" in message
    assert "routine:11: steps[1].pressure_kpa: LUNA 3 does not measure pressure or contact" in (
        message
    )
    assert 'write timing = "time" and duration_s' in message
    assert "steps[2]" not in message  # the step by time fits
    assert [p.path for p in refused.value.problems] == ["steps[1].pressure_kpa"]
    # Nothing but the stop every connect writes reached the device.
    assert [w.data for w in luna.writes] == [bytes([0x01, 0x00, 0x00])]
    refusals = store.sessions()
    assert [r.status for r in refusals] == ["refused"]
    assert "does not measure pressure or contact" in (refusals[0].end_reason or "")


async def test_a_device_that_refuses_its_commands_ends_the_session(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    catalogue: DeviceCatalogue,
) -> None:
    """From 10 s on the device answers every write with an ATT error (a real device that
    differs from the description): at the zone change the intensity is refused, the
    session stops, and the record says the motor could not be stopped."""
    luna = world.add_foreo(name="LUNA 3")
    routine = timed_routine(policy, timed_step("cheek_left", 20, 5) + timed_step("chin", 20, 4))
    base: Any = world.client_backend

    class Refusing(base):  # type: ignore[misc,valid-type]
        async def write_gatt_char(self, characteristic: Any, data: Any, response: bool) -> None:
            if clock.now_s() >= refuse_from_s:
                raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.WRITE_NOT_PERMITTED)
            await super().write_gatt_char(characteristic, data, response)

    refuse_from_s = float("inf")
    async with world:
        clock.start()
        backends = BleBackends(world.scanner_backend, Refusing)
        session = await foreo_session(world, luna, catalogue, backends)
        run = runner(session, routine, policy, store)
        task = asyncio.ensure_future(run.run(max_duration_s=MAX_RUN_S))
        await clock.sleep(10.0)
        refuse_from_s = clock.now_s()
        result = await task
        still_running = luna.speed
        await session.close()

    assert result.status == "stopped"
    assert result.end_reason == (
        "device_fault; the device could not be told to stop: switch it off by hand"
    )
    fault = result.decisions[-1]
    assert (fault.kind, fault.reason) == (DecisionKind.STOP, "device_fault")
    assert "NOT_SUPPORTED" in fault.message
    assert 20.0 <= fault.at_s <= 20.0 + LATENCY_S
    assert still_running == 5  # what the device last accepted; it refused the stop
    assert run.command_errors
