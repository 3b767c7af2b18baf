"""The shipped policy and routines, and the validation errors users see."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from devicebridge.core.policy import default_policy, default_policy_text, parse_policy
from devicebridge.core.routine import parse_routine
from devicebridge.errors import DeviceBridgeError, PolicyError, RoutineError

ROUTINES = resources.files("devicebridge") / "data" / "routines"


def _routine_texts() -> dict[str, str]:
    return {
        entry.name: entry.read_text("utf-8")
        for entry in ROUTINES.iterdir()
        if entry.name.endswith(".toml")
    }


def test_every_limit_in_the_default_policy_names_a_listed_source() -> None:
    data = tomllib.loads(default_policy_text())
    sources = data["sources"]
    limits = 0

    def walk(node: object, path: str) -> None:
        nonlocal limits
        if isinstance(node, dict):
            if "value" in node or "min" in node:
                limits += 1
                assert node.get("source") in sources, f"{path} has no listed source"
                return
            for key, child in node.items():
                walk(child, f"{path}.{key}" if path else key)

    for section in ("zones", "session", "led", "temperature", "cooldowns", "frequency"):
        walk(data[section], section)
    assert limits >= 50
    # Every source names a paper, standard, manual or clinic page, with its tag.
    for key, text in sources.items():
        assert re.match(r"^\[[ABE]\]", text), key


def test_default_policy_numbers_match_the_domain_reference() -> None:
    policy = default_policy()
    assert policy.zones["eye_area"].cap_kpa.value == 4.0
    assert policy.zones["masseter"].cap_kpa.value == 90.0
    assert policy.zones["masseter"].pass_cap_s.value == 60
    assert policy.temperature_warn_c.value == 41.0
    assert policy.temperature_stop_c.value == 43.0
    assert (policy.flicker_forbidden_hz.min, policy.flicker_forbidden_hz.max) == (3.0, 60.0)
    assert policy.cooldowns["filler"].massage_block_h.value == 14 * 24
    assert policy.frequency["firming"].max_sessions.value == 2
    assert policy.frequency["firming"].per_days.value == 7
    assert policy.led["blue"].dose_cap_session_j_cm2.value == 50


def test_policy_errors_list_every_problem_with_its_line() -> None:
    text = default_policy_text()
    text = text.replace(
        'warn_c = { value = 41.0, source = "iec60601" }', "warn_c = { value = 45.0 }"
    )
    text = text.replace(
        'cap_kpa = { value = 4.0, source = "zone_bands_estimate" }',
        'cap_kpa = { value = 2.0, source = "made_up" }',
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, label="my_policy.toml")
    rendered = str(info.value)
    assert "temperature.warn_c: names no source" in rendered
    assert "temperature.warn_c: warn level 45 is above the stop level" in rendered
    assert "zones.eye_area.cap_kpa: source 'made_up' is not a key of [sources]" in rendered
    assert "zones.eye_area.band_kpa: band max 3 is above the cap 2" in rendered
    warn_line = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("warn_c"))
    assert f"my_policy.toml:{warn_line}: temperature.warn_c" in rendered


def test_policy_that_is_not_toml_says_so() -> None:
    with pytest.raises(PolicyError, match="not valid TOML"):
        parse_policy("[policy\nname=1")


@pytest.mark.parametrize("name", sorted(_routine_texts()))
def test_starter_routines_are_valid_and_explain_themselves(name: str) -> None:
    routine = parse_routine(_routine_texts()[name], default_policy(), label=name)
    assert len(routine.rationale) > 200
    assert routine.steps


def test_starter_library_covers_the_required_routines() -> None:
    names = set(_routine_texts())
    assert {
        "firming.toml",
        "lymphatic_drainage.toml",
        "masseter_relaxation.toml",
        "post_treatment_drainage.toml",
        "led_red_near_infrared.toml",
        "led_blue_blemishes.toml",
    } <= names


def _firming() -> str:
    return _routine_texts()["firming.toml"]


def test_unsafe_step_names_its_place_and_the_policy_rule() -> None:
    text = _firming().replace('zone = "jawline_left"', 'zone = "eye_area_left"', 1)
    with pytest.raises(RoutineError) as info:
        parse_routine(text, default_policy(), label="mine.toml")
    problem = next(p for p in info.value.problems if p.path == "steps[3].pressure_kpa")
    assert "above the eye-area cap of 4 kPa" in problem.message
    assert problem.rule is not None
    assert problem.rule.startswith("zones.eye_area.cap_kpa = 4")
    lines = text.splitlines()
    assert lines[problem.line - 1].startswith("pressure_kpa")  # type: ignore[operator]
    # the third [[steps]] table holds that line
    step_headers = [i + 1 for i, line in enumerate(lines) if line == "[[steps]]"]
    assert step_headers[2] < problem.line < step_headers[3]  # type: ignore[operator]


def test_routine_may_not_be_looser_than_the_policy_schedule() -> None:
    text = _firming().replace("max_sessions = 2", "max_sessions = 3")
    with pytest.raises(RoutineError, match="3 sessions is more than the policy's 2 per 7 days"):
        parse_routine(text, default_policy())
    stricter = _firming().replace("max_sessions = 2", "max_sessions = 1")
    assert parse_routine(stricter, default_policy()).schedule.max_sessions == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("intensity = 5", "intensity = 0"), "steps[1].intensity: must be an integer 1..10"),
        (("contact_time_s = 60", "contact_time_s = 90"), "above the 60 s cap per pass"),
        (('mode = "vibration"', 'mode = "laser"'), "unknown mode 'laser'"),
        (('device_kind = "massager"', 'device_kind = "toaster"'), "routine.device_kind"),
        (('zone = "chin"', 'zone = "nose"'), "unknown zone 'nose'"),
        (("guidance = ", "guidence = "), "unknown key"),
        (("{ min = 4.0, max = 12.0 }", "{ min = 12.0, max = 4.0 }"), "must be below max"),
    ],
)
def test_malformed_routines_are_refused_with_the_place(
    change: tuple[str, str], expected: str
) -> None:
    text = _firming().replace(*change, 1)
    with pytest.raises(RoutineError) as info:
        parse_routine(text, default_policy(), label="r.toml")
    assert expected in str(info.value)
    assert all(p.line is not None for p in info.value.problems if p.path != "(file)")


def test_led_routine_over_the_dose_cap_and_in_the_flicker_band() -> None:
    text = _routine_texts()["led_blue_blemishes.toml"]
    text = text.replace("blue_mw_cm2 = 30.0", "blue_mw_cm2 = 40.0").replace(
        "duration_s = 900", "duration_s = 1200\npulse_hz = 10"
    )
    with pytest.raises(RoutineError) as info:
        parse_routine(text, default_policy())
    rendered = str(info.value)
    assert "blue dose 48.0" not in rendered  # 48 J/cm² is under the 50 cap
    assert "10 Hz flicker lies in the forbidden 3-60 Hz band" in rendered
    over = text.replace("blue_mw_cm2 = 40.0", "blue_mw_cm2 = 45.0")
    with pytest.raises(RoutineError, match=r"blue dose 54\.0 J/cm² is above the per-session cap"):
        parse_routine(over, default_policy())


def test_not_toml_is_refused() -> None:
    with pytest.raises(RoutineError, match="not valid TOML") as info:
        parse_routine("[[steps]\n", default_policy())
    # One error tree: callers catching DeviceBridgeError see file problems too.
    assert isinstance(info.value, DeviceBridgeError)


def test_routines_do_not_read_the_shared_reference() -> None:
    # Users will not have ../shared: nothing shipped may point there.
    package = Path(str(resources.files("devicebridge")))
    for path in package.rglob("*"):
        if path.suffix in {".py", ".toml"}:
            assert "shared/reference" not in path.read_text("utf-8"), path
