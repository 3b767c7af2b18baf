"""Ways a routine (local or signed) could loosen the policy, each refused.

Every number is finite and in its range, every limit is compared as the limit it is (per
side, per zone, per window), categories are matched as the policy knows them, and nothing
but a :class:`RoutineError` / :class:`PolicyError` (both :class:`DeviceBridgeError`) comes
out of a file.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta
from importlib import resources

import pytest

from devicebridge.core.admission import PastSession, check_admission
from devicebridge.core.policy import default_policy, default_policy_text, parse_policy
from devicebridge.core.routine import DeviceKindName, Routine, Schedule, parse_routine
from devicebridge.device.program_transfer import program_from_routine
from devicebridge.errors import DeviceBridgeError, PolicyError, RoutineError

ROUTINES = resources.files("devicebridge") / "data" / "routines"
NOW = datetime(2026, 11, 23, 18, 0)
POLICY = default_policy()


def starter(name: str) -> str:
    return (ROUTINES / name).read_text("utf-8")


def massage(steps: list[tuple[str, float]], *, category: str = "general", extra: str = "") -> str:
    body = "".join(
        f"""
[[steps]]
zone = "{zone}"
contact_time_s = {seconds}
mode = "percussion"
intensity = 5
pressure_kpa = {{ min = 5.0, max = 12.0 }}
"""
        for zone, seconds in steps
    )
    return f"""[routine]
name = "loosening"
author = "tests"
version = "1"
device_kind = "massager"
category = "{category}"
{extra}
{body}"""


def refused(text: str) -> RoutineError:
    with pytest.raises(RoutineError) as info:
        parse_routine(text, POLICY, label="r.toml")
    error = info.value
    assert isinstance(error, DeviceBridgeError)
    return error


def problem_at(error: RoutineError, path: str) -> str:
    found = [p for p in error.problems if p.path == path]
    assert found, [p.render("r.toml") for p in error.problems]
    assert found[0].line is not None
    return found[0].render("r.toml")


def session(at: datetime, category: str = "firming", completion: float = 1.0) -> PastSession:
    return PastSession(
        at, category, DeviceKindName.MASSAGER, completed=completion >= 1.0, completion=completion
    )


def admit(routine: Routine, history: list[PastSession], now: datetime = NOW) -> list[str]:
    admission = check_admission(routine, POLICY, now=now, history=history, treatments=[])
    return [f"{r.message} (policy: {r.rule})" for r in admission.refusals]


# --------------------------------------------------------------------------- per side


def test_ten_masseter_passes_on_one_side_are_refused_as_five_per_side() -> None:
    error = refused(massage([("masseter_left", 30.0)] * 10, category="deep_tissue"))
    text = problem_at(error, "steps[6].zone")
    assert "6th pass on masseter_left" in text
    assert "zones.masseter.passes_cap = 5" in text
    # Five a side is the protocol (Trials 2014).
    both = [("masseter_left", 30.0), ("masseter_right", 30.0)] * 5
    assert parse_routine(massage(both, category="deep_tissue"), POLICY).steps


def test_contact_per_zone_side_over_its_session_cap_is_refused() -> None:
    # Six minutes on the left cheek, each pass within its 60 s cap.
    steps = [("cheek_left", 60.0), ("cheek_right", 30.0)] * 6
    error = refused(massage(steps))
    text = problem_at(error, "steps[11].contact_time_s")
    assert "360 s on cheek_left in this routine is above the 300 s cap per side per session" in text
    assert "zones.cheek.session_cap_s = 300" in text
    assert not any("cheek_right" in p.message for p in error.problems)
    # Five minutes a side is allowed (Miyaji 2018: 5 min per cheek).
    assert parse_routine(massage(steps[:10]), POLICY).steps


# --------------------------------------------------------------------------- frequency


def test_a_schedule_looser_in_count_or_window_is_refused() -> None:
    text = starter("firming.toml").replace("max_sessions = 2", "max_sessions = 1000")
    text = text.replace("per_days = 7", "per_days = 3500")
    error = refused(text)
    assert "more than the policy's 2" in problem_at(error, "schedule.max_sessions")
    assert "frequency.firming.max_sessions = 2" in problem_at(error, "schedule.max_sessions")
    assert "per_days" in problem_at(error, "schedule.per_days")
    shorter = starter("firming.toml").replace("per_days = 7", "per_days = 3")
    assert "shorter than the policy's 7 days" in problem_at(refused(shorter), "schedule.per_days")
    fraction = starter("firming.toml").replace("per_days = 7", "per_days = 7.5")
    assert "whole number" in problem_at(refused(fraction), "schedule.per_days")
    stricter = starter("firming.toml").replace("per_days = 7", "per_days = 14")
    schedule = parse_routine(stricter, POLICY).schedule
    assert schedule == Schedule(2, 14)


def test_admission_applies_the_policy_rule_whatever_the_routine_says() -> None:
    # A routine object with a loose schedule (as if validation had let it through): the
    # eleventh session of the day is not admitted, nor is the third of the week.
    firming = parse_routine(starter("firming.toml"), POLICY)
    loose = dataclasses.replace(firming, schedule=Schedule(1000, 3500))
    today = [session(NOW - timedelta(hours=h)) for h in range(1, 11)]
    (refusal,) = admit(loose, today)
    assert "frequency.firming.max_sessions = 2" in refusal
    week = [session(NOW - timedelta(days=5)), session(NOW - timedelta(days=2))]
    (refusal,) = admit(loose, week)
    assert "the next session is allowed from 2026-11-25 18:00" in refusal


def test_the_routine_schedule_applies_as_well_as_the_policy_rule() -> None:
    text = starter("firming.toml").replace("max_sessions = 2", "max_sessions = 1")
    strict = parse_routine(text.replace("per_days = 7", "per_days = 14"), POLICY)
    (refusal,) = admit(strict, [session(NOW - timedelta(days=10))])
    assert "routine [schedule]" in refusal
    assert "allowed from 2026-11-27 18:00" in refusal


@pytest.mark.parametrize("spelling", ["Firming", "FIRMING", " firming ", "firming"])
def test_categories_are_matched_whatever_their_case_and_spaces(spelling: str) -> None:
    text = starter("firming.toml").replace('category = "firming"', f'category = "{spelling}"')
    routine = parse_routine(text, POLICY)
    assert routine.category == "firming"
    history = [
        session(NOW - timedelta(days=4), "Firming"),
        session(NOW - timedelta(days=1), "FIRMING "),
    ]
    (refusal,) = admit(routine, history)
    assert "frequency.firming.max_sessions = 2" in refusal


def test_spaces_and_hyphens_match_underscores() -> None:
    text = starter("led_red_near_infrared.toml").replace(
        'category = "led_red_near_infrared"', 'category = "LED red near-infrared"'
    )
    routine = parse_routine(text, POLICY)
    assert routine.category == "led_red_near_infrared"
    earlier = PastSession(
        NOW - timedelta(hours=5), "led-red-near-infrared", DeviceKindName.LED_MASK, True, {}
    )
    refusals = admit(routine, [earlier])
    assert any("frequency.led_red_near_infrared.max_sessions = 1" in r for r in refusals)


def test_an_unknown_category_is_held_to_every_frequency_rule() -> None:
    routine = parse_routine(massage([("cheek_left", 30.0)], category="Fiming"), POLICY)
    assert routine.category == "fiming"
    # The led rule: at most one a day; sessions of any unknown category count together.
    (refusal,) = admit(routine, [session(NOW - timedelta(hours=2), "relaxation")])
    assert "frequency.led_red_near_infrared.max_sessions = 1" in refusal
    assert "'fiming' is not a category the policy knows" in refusal
    assert "firming" in refusal  # the known ones are listed
    # The firming rule: at most two a week.
    week = [session(NOW - timedelta(days=d), "other") for d in (3, 5)]
    assert any("frequency.firming.max_sessions = 2" in r for r in admit(routine, week))
    # Known categories without a rule have none.
    drainage = parse_routine(massage([("cheek_left", 30.0)], category="drainage"), POLICY)
    assert admit(drainage, [session(NOW - timedelta(hours=h), "drainage") for h in range(5)]) == []


def test_a_schedule_in_an_unknown_category_must_be_stricter_than_every_rule() -> None:
    loose = massage(
        [("cheek_left", 30.0)], category="x", extra="[schedule]\nmax_sessions = 2\nper_days = 1\n"
    )
    error = refused(loose)
    assert "frequency.led_red_near_infrared.max_sessions = 1" in problem_at(
        error, "schedule.max_sessions"
    )
    assert "frequency.firming.per_days = 7" in problem_at(error, "schedule.per_days")


# --------------------------------------------------------------------------- numbers


FIRMING_CHANGES = [
    ("contact_time_s = 60", "contact_time_s = nan", "steps[1].contact_time_s"),
    ("contact_time_s = 60", "contact_time_s = inf", "steps[1].contact_time_s"),
    ("contact_time_s = 60", "contact_time_s = 1e400", "steps[1].contact_time_s"),
    ("contact_time_s = 60", "contact_time_s = true", "steps[1].contact_time_s"),
    ("min = 4.0", "min = nan", "steps[1].pressure_kpa.min"),
    ("max = 12.0", "max = nan", "steps[1].pressure_kpa.max"),
    ("min = 4.0", "min = -inf", "steps[1].pressure_kpa.min"),
    ("max = 12.0", "max = 1" + "0" * 400, "steps[1].pressure_kpa.max"),  # found by hypothesis
    ("intensity = 5", "intensity = 5.0", "steps[1].intensity"),
    ("max_sessions = 2", "max_sessions = nan", "schedule.max_sessions"),
    ("max_sessions = 2", "max_sessions = inf", "schedule.max_sessions"),
    ("max_sessions = 2", "max_sessions = 1" + "0" * 400, "schedule.max_sessions"),
    ("per_days = 7", "per_days = nan", "schedule.per_days"),
    ("per_days = 7", "per_days = inf", "schedule.per_days"),
    ("per_days = 7", "per_days = 99999999999999999999999", "schedule.per_days"),
    ("per_days = 7", "per_days = true", "schedule.per_days"),
]
LED_CHANGES = [
    ("red_mw_cm2 = 15.0", "red_mw_cm2 = nan", "steps[1].red_mw_cm2"),
    ("red_mw_cm2 = 15.0", "red_mw_cm2 = -0.5", "steps[1].red_mw_cm2"),
    ("duration_s = 600", "duration_s = nan", "steps[1].duration_s"),
    ("duration_s = 600", "duration_s = inf", "steps[1].duration_s"),
    ("duration_s = 600", "duration_s = 600\npulse_hz = nan", "steps[1].pulse_hz"),
    ("duration_s = 600", "duration_s = 600\npulse_hz = inf", "steps[1].pulse_hz"),
    ("duration_s = 600", "duration_s = 600\npulse_hz = 1e9", "steps[1].pulse_hz"),
    # 2.96 Hz is outside the 3-60 Hz band, but the device's 0.1 Hz steps make it 3.0 Hz.
    ("duration_s = 600", "duration_s = 600\npulse_hz = 2.96", "steps[1].pulse_hz"),
    ("within_min = 60", "within_min = nan", "sequencing.within_min"),
    ("within_min = 60", "within_min = inf", "sequencing.within_min"),
    ("within_min = 60", "within_min = 100000", "sequencing.within_min"),
]


@pytest.mark.parametrize(
    ("name", "change"),
    [("firming.toml", c) for c in FIRMING_CHANGES]
    + [("led_red_near_infrared.toml", c) for c in LED_CHANGES],
    ids=lambda value: value[1][:40] if isinstance(value, tuple) else value,
)
def test_numbers_that_are_not_finite_or_out_of_range_are_refused_with_their_place(
    name: str, change: tuple[str, str, str]
) -> None:
    old, new, path = change
    text = starter(name)
    assert old in text
    error = refused(text.replace(old, new, 1))
    rendered = problem_at(error, path)
    line = next(p.line for p in error.problems if p.path == path)
    assert rendered.startswith(f"r.toml:{line}: {path}: ")
    assert len(rendered) < 400  # a huge integer is not printed in full


def test_every_accepted_starter_routine_encodes_as_a_device_program() -> None:
    for entry in ROUTINES.iterdir():
        if entry.name.endswith(".toml"):
            program = program_from_routine(parse_routine(entry.read_text("utf-8"), POLICY), POLICY)
            assert program.encode()


def test_pulse_rates_the_program_format_cannot_carry_are_refused_before_encoding() -> None:
    text = starter("led_red_near_infrared.toml").replace(
        "duration_s = 600", "duration_s = 600\npulse_hz = 7000"
    )
    assert "6553.5" in problem_at(refused(text), "steps[1].pulse_hz")
    fine = text.replace("pulse_hz = 7000", "pulse_hz = 6553.5")
    program_from_routine(parse_routine(fine, POLICY), POLICY).encode()


def test_more_steps_than_a_device_program_holds_are_refused() -> None:
    error = refused(massage([("forehead", 1.0), ("chin", 1.0)] * 40))
    assert "at most 64 steps" in problem_at(error, "steps")


def test_a_band_too_narrow_for_the_device_resolution_is_refused() -> None:
    text = starter("firming.toml").replace("{ min = 4.0, max = 12.0 }", "{ min = 4.0, max = 4.01 }")
    assert "0.02 kPa" in problem_at(refused(text), "steps[1].pressure_kpa")


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("cap_kpa = { value = 4.0,", "cap_kpa = { value = nan,", "zones.eye_area.cap_kpa"),
        ("pass_cap_s = { value = 45,", "pass_cap_s = { value = inf,", "zones.eye_area.pass_cap_s"),
        (
            'value = 1200, source = "session_length_estimate"',
            'value = 1e400, source = "session_length_estimate"',
            "session.massage_length_cap_s",
        ),
        ("warn_c = { value = 41.0,", "warn_c = { value = true,", "temperature.warn_c"),
        ("forbidden_hz = { min = 3.0,", "forbidden_hz = { min = nan,", "led.flicker.forbidden_hz"),
        (
            "max_sessions = { value = 2,",
            "max_sessions = { value = 2.5,",
            "frequency.firming.max_sessions",
        ),
        (
            '[policy]\nname = "devicebridge default"\nversion = 1',
            '[policy]\nname = "devicebridge default"\nversion = true',
            "policy.version",
        ),
        ("pass_cap_s = { value = 45,", "pass_cap_s = { vlaue = 45,", "zones.eye_area.pass_cap_s"),
        (
            "passes_cap = { value = 5,",
            "passes_cap_typo = { value = 5,",
            "zones.masseter.passes_cap_typo",
        ),
    ],
)
def test_policy_numbers_are_finite_in_range_and_misspelt_keys_are_errors(
    old: str, new: str, path: str
) -> None:
    text = default_policy_text()
    assert old in text
    with pytest.raises(PolicyError) as info:
        parse_policy(text.replace(old, new, 1), label="p.toml")
    assert isinstance(info.value, DeviceBridgeError)
    found = [p for p in info.value.problems if p.path == path]
    assert found, str(info.value)
    assert found[0].line is not None


# --------------------------------------------------------------------------- errors


def test_routine_and_policy_errors_are_devicebridge_errors() -> None:
    from devicebridge.core import policy, routine

    for error in (RoutineError, PolicyError):
        assert issubclass(error, DeviceBridgeError)
        assert issubclass(error, ValueError)
    assert routine.RoutineError is RoutineError
    assert policy.PolicyError is PolicyError


# --------------------------------------------------------------------------- what counts


def test_a_session_cancelled_early_does_not_count_toward_the_frequency_rule() -> None:
    firming = parse_routine(starter("firming.toml"), POLICY)
    cancelled = session(NOW - timedelta(days=1), completion=0.0)  # 20 s, never on the skin
    assert admit(firming, [session(NOW - timedelta(days=3)), cancelled]) == []
    assert admit(firming, [session(NOW - timedelta(days=3)), session(NOW - timedelta(days=1))])


def test_a_session_past_the_counting_fraction_counts_and_short_ones_add_up() -> None:
    firming = parse_routine(starter("firming.toml"), POLICY)
    fraction = POLICY.frequency_count_fraction.value
    assert 0 < fraction <= 1
    full = session(NOW - timedelta(days=3))
    assert admit(firming, [full, session(NOW - timedelta(days=1), completion=fraction)])
    # Three short attempts of 40 % are more than one session's worth: one session.
    short = [session(NOW - timedelta(days=d), completion=0.4) for d in (1, 2, 4)]
    refusals = admit(firming, [full, *short])
    assert refusals
    assert "allowed from 2026-11-26 18:00" in refusals[0]  # when the oldest short one leaves


def test_any_number_of_the_policy_replaced_by_anything_is_refused_with_its_place() -> None:
    # Every value, min and max of the shipped policy, replaced in turn by hostile literals.
    text = default_policy_text()
    spots = list(re.finditer(r"\b(?:value|min|max) = (-?[0-9][0-9.e+-]*)", text))
    assert len(spots) > 60
    for spot in spots:
        for literal in ("nan", "inf", "-inf", "1" + "0" * 400, "-1", "true", '"5"', "[1]", "1e308"):
            changed = text[: spot.start(1)] + literal + text[spot.end(1) :]
            with pytest.raises(PolicyError) as info:  # no number of a policy may be any of these
                parse_policy(changed, label="p.toml")
            assert all(p.line is not None for p in info.value.problems), str(info.value)
