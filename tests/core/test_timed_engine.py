"""The engine of routines by time: decisions at the moments they fall due, whatever ticks."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from devicebridge.core.engine import DecisionKind
from devicebridge.core.policy import SafetyPolicy, default_policy, default_policy_text, parse_policy
from devicebridge.core.routine import Routine, StepTiming, parse_routine
from devicebridge.core.timed import LINK_LOST, MOVE_CUE, TimedMassageEngine

POLICY = default_policy()


def routine(*steps: tuple[str, float, int], policy: SafetyPolicy = POLICY) -> Routine:
    body = "".join(
        f'\n[[steps]]\nzone = "{zone}"\ntiming = "time"\nduration_s = {seconds}\n'
        f"intensity = {level}\n"
        for zone, seconds, level in steps
    )
    text = (
        '[routine]\nname = "t"\nauthor = "tests"\nversion = "1"\ndevice_kind = "massager"\n' + body
    )
    return parse_routine(text, policy, label="t.toml")


def run_ticking(engine: TimedMassageEngine, tick_s: float, until_s: float) -> None:
    engine.start()
    t = 0.0
    while not engine.finished and t < until_s:
        t = round(t + tick_s, 9)
        engine.tick(t)


def test_cues_every_interval_within_a_zone_and_at_every_zone_change() -> None:
    engine = TimedMassageEngine(routine(("forehead", 50, 6), ("chin", 31, 4)), POLICY)
    run_ticking(engine, 0.5, 200)
    assert [(d.kind, d.reason, d.at_s, d.zone) for d in engine.decisions] == [
        (DecisionKind.GUIDANCE, "step_start", 0.0, "forehead"),
        (DecisionKind.GUIDANCE, MOVE_CUE, 15.0, "forehead"),
        (DecisionKind.GUIDANCE, MOVE_CUE, 30.0, "forehead"),
        (DecisionKind.GUIDANCE, MOVE_CUE, 45.0, "forehead"),
        (DecisionKind.NEXT_STEP, "step_done", 50.0, "chin"),
        (DecisionKind.GUIDANCE, MOVE_CUE, 65.0, "chin"),
        (DecisionKind.COMPLETE, "complete", 81.0, "chin"),
    ]
    assert engine.summary.completed
    assert engine.summary.time_s_by_zone == {"forehead": 50.0, "chin": 31.0}
    assert engine.summary.cues == 4
    assert engine.intensity == 0  # finished: the motor is off


@given(st.floats(0.01, 7.0), st.integers(0, 3))
def test_decisions_do_not_depend_on_how_often_time_is_handed_in(
    tick_s: float, late_ticks: int
) -> None:
    steps = (("cheek_left", 40, 5), ("cheek_right", 25.5, 5), ("neck", 10, 3))
    reference = TimedMassageEngine(routine(*steps), POLICY)
    reference.start()
    reference.tick(1000.0)  # everything at once, long after
    engine = TimedMassageEngine(routine(*steps), POLICY)
    run_ticking(engine, tick_s, 1000.0)
    for _ in range(late_ticks):
        engine.tick(2000.0)
    assert engine.decisions == reference.decisions


def test_next_due_and_time_left_follow_the_clock() -> None:
    engine = TimedMassageEngine(routine(("cheek_left", 40, 5)), POLICY)
    assert engine.next_due_s is None
    assert engine.intensity == 0
    engine.start()
    assert engine.next_due_s == 15.0
    assert engine.intensity == 5
    engine.tick(10.0)
    assert engine.step_remaining_s == 30.0
    assert engine.session_remaining_s == 30.0
    engine.tick(15.0)
    assert engine.next_due_s == 30.0
    engine.tick(39.999)
    assert engine.next_due_s == 40.0
    assert not engine.finished


def test_a_lost_link_stops_the_session_and_counts_the_time_spent() -> None:
    engine = TimedMassageEngine(routine(("cheek_left", 40, 5), ("chin", 20, 4)), POLICY)
    engine.start()
    engine.tick(12.5)
    stop = engine.link_lost(13.0)
    assert [(d.kind, d.reason, d.at_s) for d in stop] == [(DecisionKind.STOP, LINK_LOST, 13.0)]
    assert engine.finished
    assert engine.summary.stopped_reason == LINK_LOST
    assert engine.summary.time_s_by_zone == {"cheek_left": 13.0}
    assert round(engine.summary.completion, 4) == round(13.0 / 60.0, 4)
    assert engine.tick(100.0) == []
    assert engine.link_lost(101.0) == []


def zone_value(text: str, zone: str, key: str, value: float) -> str:
    """The policy text with ``zones.ZONE.KEY`` set to ``value`` (its source kept)."""
    changed, count = re.subn(
        rf"(\[zones\.{zone}\]\n(?:.*\n)*?{key} = \{{ value = )[^,]+,",
        rf"\g<1>{value:g},",
        text,
        count=1,
    )
    assert count == 1
    return changed


def test_caps_of_a_stricter_policy_cut_steps_and_the_session_by_the_clock() -> None:
    text = zone_value(default_policy_text(), "forehead", "pass_cap_s", 20)
    text = zone_value(text, "chin", "session_cap_s", 30)
    text = text.replace(
        "massage_length_cap_s = { value = 1200,", "massage_length_cap_s = { value = 70,"
    )
    policy = parse_policy(text, label="stricter.toml")
    engine = TimedMassageEngine(
        routine(("forehead", 45, 6), ("chin", 25, 4), ("chin", 25, 4), ("neck", 40, 3)), policy
    )
    run_ticking(engine, 1.0, 500)
    kinds = [(d.kind, d.reason, d.at_s) for d in engine.decisions if d.reason != MOVE_CUE]
    assert kinds == [
        (DecisionKind.GUIDANCE, "step_start", 0.0),
        (DecisionKind.STOP_STEP, "zone_time_cap", 20.0),  # the forehead's 20 s pass cap
        (DecisionKind.NEXT_STEP, "step_done", 20.0),
        (DecisionKind.NEXT_STEP, "step_done", 45.0),
        (DecisionKind.STOP_STEP, "zone_time_cap", 50.0),  # 30 s on the chin this session
        (DecisionKind.NEXT_STEP, "step_done", 50.0),
        (DecisionKind.STOP, "session_cap", 70.0),
    ]
    rules = [d.rule or "" for d in engine.decisions if d.kind is not DecisionKind.GUIDANCE]
    assert "zones.forehead.pass_cap_s = 20" in rules[0]
    assert "zones.chin.session_cap_s = 30" in rules[3]
    assert "session.massage_length_cap_s = 70" in rules[-1]
    assert engine.summary.time_s_by_zone == {"forehead": 20.0, "chin": 30.0, "neck": 20.0}
    assert not engine.summary.completed


def test_a_routine_that_fills_the_session_cap_exactly_completes() -> None:
    text = default_policy_text().replace(
        "massage_length_cap_s = { value = 1200,", "massage_length_cap_s = { value = 60,"
    )
    policy = parse_policy(text, label="short.toml")
    engine = TimedMassageEngine(routine(("cheek_left", 30, 5), ("cheek_right", 30, 5)), policy)
    run_ticking(engine, 0.7, 200)
    assert engine.summary.completed
    assert engine.decisions[-1].kind is DecisionKind.COMPLETE


def test_steps_by_time_parse_without_a_band_and_keep_the_zones_policy_band() -> None:
    parsed = routine(("eye_area_left", 30, 2))
    step = parsed.steps[0]
    assert step.timing is StepTiming.TIME
    assert step.band_from_policy
    band = POLICY.zones["eye_area"].band_kpa
    assert (step.pressure_min_kpa, step.pressure_max_kpa) == (band.min, band.max)
