"""May a routine run now: frequency, cool-downs, daily LED dose, sequencing."""

from __future__ import annotations

from datetime import datetime, timedelta
from importlib import resources

import pytest

from devicebridge.core.admission import PastSession, Treatment, check_admission
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import DeviceKindName, Routine, parse_routine

ROUTINES = resources.files("devicebridge") / "data" / "routines"
NOW = datetime(2026, 11, 23, 18, 0)


def routine(name: str) -> Routine:
    return parse_routine((ROUTINES / name).read_text("utf-8"), default_policy(), label=name)


def massage(at: datetime, category: str = "firming") -> PastSession:
    return PastSession(at, category, DeviceKindName.MASSAGER, completed=True)


def test_third_firming_session_within_seven_days_is_refused_with_the_next_allowed_time() -> None:
    history = [massage(NOW - timedelta(days=5)), massage(NOW - timedelta(days=2))]
    admission = check_admission(
        routine("firming.toml"), default_policy(), now=NOW, history=history, treatments=[]
    )
    assert not admission.allowed
    (refusal,) = admission.refusals
    assert refusal.reason == "frequency"
    assert refusal.allowed_from == NOW + timedelta(days=2)
    assert "allowed from 2026-11-25 18:00" in refusal.message
    assert refusal.rule.startswith("frequency.firming.max_sessions = 2")


def test_two_firming_sessions_a_week_are_allowed() -> None:
    history = [massage(NOW - timedelta(days=8)), massage(NOW - timedelta(days=2))]
    admission = check_admission(
        routine("firming.toml"), default_policy(), now=NOW, history=history, treatments=[]
    )
    assert admission.allowed


def test_other_categories_do_not_count_toward_firming() -> None:
    history = [massage(NOW - timedelta(days=1), "drainage")] * 5
    assert check_admission(
        routine("firming.toml"), default_policy(), now=NOW, history=history, treatments=[]
    ).allowed


def test_massage_of_a_filler_zone_within_14_days_is_refused() -> None:
    filler = Treatment("filler", NOW - timedelta(days=10), ("cheek_left", "nasolabial"))
    admission = check_admission(
        routine("firming.toml"), default_policy(), now=NOW, history=[], treatments=[filler]
    )
    (refusal,) = admission.refusals
    assert refusal.reason == "cooldown"
    assert refusal.allowed_from == NOW + timedelta(days=4)
    assert "filler on cheek" in refusal.message
    assert "cooldowns.filler.massage_block_h = 336" in refusal.rule
    later = check_admission(
        routine("firming.toml"),
        default_policy(),
        now=NOW + timedelta(days=4, minutes=1),
        history=[],
        treatments=[filler],
    )
    assert later.allowed


def test_treatment_on_other_zones_does_not_block() -> None:
    filler = Treatment("filler", NOW - timedelta(days=1), ("forehead",))
    assert check_admission(
        routine("firming.toml"), default_policy(), now=NOW, history=[], treatments=[filler]
    ).allowed


def test_botox_blocks_the_led_mask_for_a_week_on_its_zones() -> None:
    botox = Treatment("botulinum_toxin", NOW - timedelta(days=3), ("forehead",))
    admission = check_admission(
        routine("led_red_near_infrared.toml"),
        default_policy(),
        now=NOW,
        history=[],
        treatments=[botox],
    )
    assert [r.reason for r in admission.refusals] == ["cooldown"]
    assert admission.refusals[0].allowed_from == NOW + timedelta(days=4)


def test_daily_led_dose_is_refused_before_the_session_and_reported() -> None:
    led = PastSession(
        NOW - timedelta(hours=3),
        "led_red_near_infrared",
        DeviceKindName.LED_MASK,
        True,
        {"red": 55.0},
    )
    admission = check_admission(
        routine("led_red_near_infrared.toml"),
        default_policy(),
        now=NOW,
        history=[led],
        treatments=[],
    )
    assert {r.reason for r in admission.refusals} >= {"daily_dose"}
    assert admission.dose_today_j_cm2["red"] == 55.0


def test_led_after_massage_is_advised() -> None:
    alone = check_admission(
        routine("led_red_near_infrared.toml"), default_policy(), now=NOW, history=[], treatments=[]
    )
    assert alone.advice
    after = check_admission(
        routine("led_red_near_infrared.toml"),
        default_policy(),
        now=NOW,
        history=[massage(NOW - timedelta(minutes=10), "drainage")],
        treatments=[],
    )
    assert not after.advice


def test_unknown_treatment_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown treatment 'laser'"):
        Treatment("laser", NOW, ("cheek",))
