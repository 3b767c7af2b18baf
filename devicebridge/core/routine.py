"""Routine programs: a TOML file of ordered steps per facial zone, checked against the policy.

Pure: :func:`parse_routine` turns TOML text into a frozen :class:`Routine` or raises
:class:`~devicebridge.errors.RoutineError` listing every problem with its place in the file
(line and key path) and, where a policy limit is broken, which rule (and its source) says
so. A routine may be stricter than the policy, never looser: every number is finite and in
its range, caps are compared per side and per zone, a schedule only narrows the policy's
frequency rule, and every value fits the device program format (``protocols.program``), so
an accepted routine can always be handed to a device. ``docs/routines.md`` describes the
format.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from devicebridge.core.policy import (
    LED_CHANNELS,
    MAX_FREQUENCY_WINDOW_DAYS,
    MAX_SESSIONS_PER_WINDOW,
    SIDED_ZONES,
    WIRE_MAX_PRESSURE_KPA,
    Limit,
    SafetyPolicy,
    canonical_category,
    policy_zone,
)
from devicebridge.core.tomlpath import (
    Problem,
    as_float,
    is_real,
    locate,
    number_problem,
    show,
)
from devicebridge.errors import RoutineError as RoutineError  # raised here; importable from here
from protocols.constants import (
    CENTI_MW_CM2_PER_MW_CM2,
    DAPA_PER_KPA,
    DECI_HZ_PER_HZ,
    MAX_INTENSITY_LEVEL,
    MAX_PROGRAM_STEPS,
    U16_MAX,
)

MASSAGE_ZONES: Final = (
    "forehead",
    "eye_area_left",
    "eye_area_right",
    "cheek_left",
    "cheek_right",
    "nasolabial_left",
    "nasolabial_right",
    "jawline_left",
    "jawline_right",
    "chin",
    "neck",
    "masseter_left",
    "masseter_right",
)
MASSAGE_MODES: Final = ("vibration", "percussion", "pulse")
MAX_INTENSITY: Final = MAX_INTENSITY_LEVEL
J_PER_MJ: Final = 1000.0  # dose J/cm² = irradiance mW/cm² x s / 1000
DEFAULT_CATEGORY: Final = "general"
MIN_STEP_S: Final = 1.0
# The device counts pressure in 0.01 kPa: a band narrower than two of its units could
# round to nothing (min = max) in a device program.
MIN_BAND_WIDTH_KPA: Final = 2 / DAPA_PER_KPA
# The device's irradiance unit: a lit channel below it would be dark in a device program.
MIN_LIT_MW_CM2: Final = 1 / CENTI_MW_CM2_PER_MW_CM2
MAX_PULSE_HZ: Final = U16_MAX / DECI_HZ_PER_HZ
# "After a massage within N minutes": admission reads at least a day of history.
MAX_SEQUENCING_WITHIN_MIN: Final = 24 * 60

_ROUTINE_KEYS: Final = {"name", "author", "version", "device_kind", "category", "rationale", "tags"}
_MASSAGE_STEP_KEYS: Final = {
    "zone",
    "timing",
    "contact_time_s",
    "duration_s",
    "mode",
    "intensity",
    "pressure_kpa",
    "guidance",
}
_LED_STEP_KEYS: Final = {
    "zone",
    "red_mw_cm2",
    "near_infrared_mw_cm2",
    "blue_mw_cm2",
    "duration_s",
    "pulse_hz",
    "guidance",
}
_TOP_KEYS: Final = {"routine", "schedule", "sequencing", "steps"}


class DeviceKindName(StrEnum):
    MASSAGER = "massager"
    LED_MASK = "led_mask"


class StepTiming(StrEnum):
    """What a massage step's time counts (``timing`` in the file)."""

    CONTACT = "contact"  # effective time with the head on the skin (needs a contact sensor)
    TIME = "time"  # time by the clock, for devices that measure no contact or pressure


@dataclass(frozen=True, slots=True)
class MassageStep:
    zone: str  # one of MASSAGE_ZONES
    # The step's time: effective contact time (timing contact, ``contact_time_s`` in the
    # file), or time by the clock (timing time, ``duration_s``). A device that senses
    # contact counts contact either way: by time is then the same or stricter.
    contact_time_s: float
    mode: str
    intensity: int
    pressure_min_kpa: float
    pressure_max_kpa: float
    guidance: str = ""
    timing: StepTiming = StepTiming.CONTACT
    # A step by time may give no band: the zone's policy band is used where pressure is
    # measured, and the step says so (``band_from_policy``).
    band_from_policy: bool = False

    @property
    def policy_zone(self) -> str:
        return policy_zone(self.zone)

    @property
    def by_time(self) -> bool:
        return self.timing is StepTiming.TIME


@dataclass(frozen=True, slots=True)
class LedStep:
    red_mw_cm2: float
    near_infrared_mw_cm2: float
    blue_mw_cm2: float
    duration_s: float
    pulse_hz: float = 0.0
    guidance: str = ""

    def irradiance_mw_cm2(self, channel: str) -> float:
        return float(getattr(self, f"{channel}_mw_cm2"))

    def dose_j_cm2(self, channel: str) -> float:
        return self.irradiance_mw_cm2(channel) * self.duration_s / J_PER_MJ


Step = MassageStep | LedStep


@dataclass(frozen=True, slots=True)
class Schedule:
    """The routine's own frequency rule, on top of the policy's: at most ``max_sessions``
    in any ``per_days`` days."""

    max_sessions: int
    per_days: int


@dataclass(frozen=True, slots=True)
class Sequencing:
    after: str  # "massage"
    within_min: float
    required: bool


@dataclass(frozen=True)
class Routine:
    name: str
    author: str
    version: str
    device_kind: DeviceKindName
    category: str  # canonical (policy.canonical_category)
    rationale: str
    steps: tuple[Step, ...]
    schedule: Schedule | None = None
    sequencing: Sequencing | None = None
    source_text: str = ""

    @property
    def total_time_s(self) -> float:
        """Planned contact (massage) or light (LED) time."""
        return sum(
            s.contact_time_s if isinstance(s, MassageStep) else s.duration_s for s in self.steps
        )

    def dose_j_cm2(self, channel: str) -> float:
        return sum(s.dose_j_cm2(channel) for s in self.steps if isinstance(s, LedStep))

    @property
    def zones(self) -> tuple[str, ...]:
        """Policy zones the routine touches (an LED mask covers the whole face)."""
        if self.device_kind is DeviceKindName.LED_MASK:
            return ("forehead", "eye_area", "cheek", "nasolabial", "jawline", "chin")
        return tuple(dict.fromkeys(s.policy_zone for s in self.steps if isinstance(s, MassageStep)))


def _ordinal(number: int) -> str:
    if number % 100 in (11, 12, 13):
        return f"{number}th"
    return f"{number}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th') }"


class _Checker:
    def __init__(self, text: str, policy: SafetyPolicy) -> None:
        self.text = text
        self.policy = policy
        self.problems: list[Problem] = []

    def add(self, path: str, message: str, rule: str | None = None) -> None:
        self.problems.append(Problem(path, message, locate(self.text, path), rule))

    def number(
        self,
        table: Mapping[str, Any],
        key: str,
        path: str,
        *,
        low: float,
        high: float | None,
        default: float | None = None,
        whole: bool = False,
        cap: Limit | None = None,
        over: str = "",
    ) -> float | None:
        """The number at ``path.key`` in ``low..high``; None (and a problem) when it is
        missing or wrong. With ``cap``, a real number above the policy limit is reported as
        ``over`` (``{value}`` and ``{cap}`` filled in), citing the rule, and still returned,
        so that the routine's totals are checked too."""
        where = f"{path}.{key}"
        value = table.get(key, default)
        if value is None:
            self.add(where, "missing")
            return None
        if cap is not None and is_real(value) and value > cap.value:
            self.add(
                where,
                over.format(value=show(value), cap=f"{cap.value:g}"),
                self.policy.cite(cap),
            )
            return as_float(value)
        problem = number_problem(value, low, high, whole=whole)
        number = as_float(value) if problem is None and is_real(value) else None
        if number is None:
            self.add(where, problem or f"{show(value)} is too large")
        return number

    def text_field(
        self, table: Mapping[str, Any], key: str, path: str, *, required: bool = True
    ) -> str:
        value = table.get(key, "")
        if not isinstance(value, str) or (required and not value.strip()):
            self.add(f"{path}.{key}", "missing" if value == "" else "must be a string")
            return ""
        return value

    def unknown_keys(self, table: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in sorted(set(table) - allowed):
            where = f"{path}.{key}" if path else key
            self.add(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def parse_routine(text: str, policy: SafetyPolicy, *, label: str = "routine") -> Routine:
    """Parse a routine and check it against ``policy``; raise :class:`RoutineError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutineError(label, [Problem("(file)", f"not valid TOML: {exc}")]) from exc
    check = _Checker(text, policy)
    check.unknown_keys(data, _TOP_KEYS, "")

    meta = data.get("routine")
    if not isinstance(meta, dict):
        check.add("routine", "missing [routine] table (name, author, version, device_kind)")
        meta = {}
    check.unknown_keys(meta, _ROUTINE_KEYS, "routine")
    name = check.text_field(meta, "name", "routine")
    author = check.text_field(meta, "author", "routine")
    version = _version(check, meta.get("version"))
    category = _category(check, meta.get("category"))
    rationale = check.text_field(meta, "rationale", "routine", required=False)
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        check.add("routine.tags", "must be a list of strings")
    raw_kind = meta.get("device_kind")
    if raw_kind not in tuple(DeviceKindName):
        check.add("routine.device_kind", f'must be "massager" or "led_mask", got {show(raw_kind)}')
        kind = DeviceKindName.MASSAGER
    else:
        kind = DeviceKindName(raw_kind)

    raw_steps = data.get("steps")
    steps: list[Step] = []
    if not isinstance(raw_steps, list) or not raw_steps:
        check.add("steps", "no steps: add [[steps]] tables")
        raw_steps = []
    elif len(raw_steps) > MAX_PROGRAM_STEPS:
        check.add(
            "steps",
            f"{len(raw_steps)} steps: a routine has at most {MAX_PROGRAM_STEPS} steps "
            "(what a device program holds)",
        )
    for number, raw in enumerate(raw_steps, start=1):
        path = f"steps[{number}]"
        if not isinstance(raw, dict):
            check.add(path, "must be a table")
            continue
        step = (
            _massage_step(check, raw, path)
            if kind is DeviceKindName.MASSAGER
            else _led_step(check, raw, path)
        )
        if step is not None:
            steps.append(step)

    schedule = _schedule(check, data.get("schedule"), category)
    sequencing = _sequencing(check, data.get("sequencing"), kind)
    if len(steps) == len(raw_steps):  # step problems are already reported; totals would mislead
        if kind is DeviceKindName.MASSAGER:
            _massage_totals(check, [s for s in steps if isinstance(s, MassageStep)])
        else:
            _led_totals(check, [s for s in steps if isinstance(s, LedStep)])

    if check.problems:
        raise RoutineError(label, check.problems)
    return Routine(
        name, author, version, kind, category, rationale, tuple(steps), schedule, sequencing, text
    )


def _version(check: _Checker, value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if is_real(value):
        return str(value)
    check.add(
        "routine.version", "missing" if value is None else f"must be a string, got {show(value)}"
    )
    return ""


def _category(check: _Checker, value: object) -> str:
    if value is None:
        return DEFAULT_CATEGORY
    if not isinstance(value, str):
        check.add("routine.category", f"must be a string, got {show(value)}")
        return DEFAULT_CATEGORY
    canonical = canonical_category(value)
    if not canonical:
        if value.strip():
            check.add("routine.category", f"{show(value)} has no letters or digits")
        return DEFAULT_CATEGORY
    return canonical


def _massage_step(check: _Checker, raw: Mapping[str, Any], path: str) -> MassageStep | None:
    policy = check.policy
    check.unknown_keys(raw, _MASSAGE_STEP_KEYS, path)
    zone = raw.get("zone")
    if not isinstance(zone, str) or zone not in MASSAGE_ZONES:
        what = "missing" if zone is None else f"unknown zone {show(zone)}"
        check.add(f"{path}.zone", f"{what}; known: {', '.join(MASSAGE_ZONES)}")
        return None
    limits = policy.zones[policy_zone(zone)]
    timing_raw = raw.get("timing", StepTiming.CONTACT.value)
    if timing_raw not in tuple(StepTiming):
        check.add(
            f"{path}.timing",
            'must be "contact" (time on the skin) or "time" (by the clock), '
            f"got {show(timing_raw)}",
        )
        return None
    timing = StepTiming(timing_raw)
    time_key, other_key = (
        ("duration_s", "contact_time_s")
        if timing is StepTiming.TIME
        else ("contact_time_s", "duration_s")
    )
    if other_key in raw:
        if timing is StepTiming.TIME:
            why = 'a step with timing = "time" lasts duration_s (by the clock)'
        else:
            why = 'duration_s is for a step with timing = "time"; this one counts contact_time_s'
        check.add(f"{path}.{other_key}", why)
    step_s = check.number(
        raw,
        time_key,
        path,
        low=MIN_STEP_S,
        high=None,
        cap=limits.pass_cap_s,
        over=f"{{value}} s on {zone} is above the {{cap}} s cap per pass",
    )
    mode = raw.get("mode", "vibration")
    if not isinstance(mode, str) or mode not in MASSAGE_MODES:
        check.add(f"{path}.mode", f"unknown mode {show(mode)}; known: {', '.join(MASSAGE_MODES)}")
    intensity = raw.get("intensity")
    intensity_cap = limits.intensity_cap
    if number_problem(intensity, 1, MAX_INTENSITY, whole=True) is not None:
        check.add(
            f"{path}.intensity", f"must be an integer 1..{MAX_INTENSITY}, got {show(intensity)}"
        )
        intensity = 0
    elif isinstance(intensity, int) and intensity > intensity_cap.value:
        check.add(
            f"{path}.intensity",
            f"intensity {intensity} on {zone} is above the zone's cap of {intensity_cap.value:g}",
            policy.cite(intensity_cap),
        )
    band = raw.get("pressure_kpa")
    low = high = None
    where = f"{path}.pressure_kpa"
    band_from_policy = band is None and timing is StepTiming.TIME
    if band_from_policy:
        low, high = limits.band_kpa.min, limits.band_kpa.max
    elif not isinstance(band, dict):
        check.add(where, "missing: pressure_kpa = { min = ..., max = ... }")
    else:
        check.unknown_keys(band, {"min", "max"}, where)
        low = check.number(band, "min", where, low=0.0, high=WIRE_MAX_PRESSURE_KPA)
        high = check.number(band, "max", where, low=0.0, high=WIRE_MAX_PRESSURE_KPA)
        if low is not None and high is not None:
            if high - low < MIN_BAND_WIDTH_KPA:
                check.add(
                    where,
                    f"min {low:g} must be below max {high:g} by at least "
                    f"{MIN_BAND_WIDTH_KPA:g} kPa (the device counts in 0.01 kPa)",
                )
            if high > limits.cap_kpa.value:
                check.add(
                    where,
                    f"band goes up to {high:g} kPa, above the "
                    f"{policy_zone(zone).replace('_', '-')} cap of {limits.cap_kpa.value:g} kPa",
                    policy.cite(limits.cap_kpa),
                )
    guidance = raw.get("guidance", "")
    if not isinstance(guidance, str):
        check.add(f"{path}.guidance", f"must be a string, got {show(guidance)}")
    if step_s is None or low is None or high is None or not isinstance(mode, str):
        return None
    assert isinstance(intensity, int)
    return MassageStep(
        zone, step_s, mode, intensity, low, high, str(guidance), timing, band_from_policy
    )


def _led_step(check: _Checker, raw: Mapping[str, Any], path: str) -> LedStep | None:
    policy = check.policy
    check.unknown_keys(raw, _LED_STEP_KEYS, path)
    if "zone" in raw and raw["zone"] != "face":
        check.add(
            f"{path}.zone",
            f'a mask covers the whole face: "face" or nothing, got {show(raw["zone"])}',
        )
    levels: dict[str, float] = {}
    for channel in LED_CHANNELS:
        cap = policy.led[channel].irradiance_cap_mw_cm2
        value = check.number(
            raw,
            f"{channel}_mw_cm2",
            path,
            low=0.0,
            high=None,
            default=0.0,
            cap=cap,
            over=f"{{value}} mW/cm² is above the {channel.replace('_', '-')} irradiance cap "
            "of {cap} mW/cm²",
        )
        if value is None:
            continue
        if 0 < value < MIN_LIT_MW_CM2:
            check.add(
                f"{path}.{channel}_mw_cm2",
                f"{value:g} mW/cm² is below the device's {MIN_LIT_MW_CM2:g} mW/cm² step: "
                "0 (off) or at least that",
            )
            continue
        levels[channel] = value
    if len(levels) == len(LED_CHANNELS) and not any(levels.values()):
        check.add(path, "no channel is lit: set red_mw_cm2, near_infrared_mw_cm2 or blue_mw_cm2")
    duration_s = check.number(
        raw,
        "duration_s",
        path,
        low=MIN_STEP_S,
        high=None,
        cap=policy.led_length_cap_s,
        over="{value} s is above the {cap} s of light a session may have",
    )
    pulse_hz = check.number(raw, "pulse_hz", path, low=0.0, high=MAX_PULSE_HZ, default=0.0)
    flicker = policy.flicker_forbidden_hz
    # The device runs the pulse rate in 0.1 Hz steps: the rate it would run is checked too.
    sent_hz = round(pulse_hz * DECI_HZ_PER_HZ) / DECI_HZ_PER_HZ if pulse_hz else 0.0
    if pulse_hz and (flicker.contains(pulse_hz) or (sent_hz and flicker.contains(sent_hz))):
        shown = f"{pulse_hz:g} Hz" + (f" (run as {sent_hz:g} Hz)" if sent_hz != pulse_hz else "")
        check.add(
            f"{path}.pulse_hz",
            f"{shown} flicker lies in the forbidden {flicker.min:g}-{flicker.max:g} Hz band",
            policy.cite(flicker),
        )
    guidance = raw.get("guidance", "")
    if not isinstance(guidance, str):
        check.add(f"{path}.guidance", f"must be a string, got {show(guidance)}")
    if duration_s is None or pulse_hz is None or len(levels) != len(LED_CHANNELS):
        return None
    return LedStep(
        levels["red"],
        levels["near_infrared"],
        levels["blue"],
        duration_s,
        pulse_hz,
        str(guidance),
    )


def _schedule(check: _Checker, raw: Any, category: str) -> Schedule | None:
    """The routine's own ``[schedule]``: whole numbers, never looser than any rule of the
    policy for the category (admission applies both)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        check.add("schedule", "must be a table")
        return None
    check.unknown_keys(raw, {"max_sessions", "per_days"}, "schedule")
    policy = check.policy
    rules = policy.frequency_rules(category)
    whose = (
        f"for {category!r}"
        if policy.knows_category(category)
        else f"for every category, as {category!r} is not one the policy knows"
    )
    values: dict[str, int] = {}
    for key, high in (
        ("max_sessions", MAX_SESSIONS_PER_WINDOW),
        ("per_days", MAX_FREQUENCY_WINDOW_DAYS),
    ):
        path = f"schedule.{key}"
        value = raw.get(key)
        problem = "missing" if value is None else number_problem(value, 1, None, whole=True)
        if problem is not None:
            check.add(path, problem)
            continue
        assert isinstance(value, int)
        looser = False
        for rule in rules:
            limit = rule.max_sessions if key == "max_sessions" else rule.per_days
            policy_rule = f"{rule.max_sessions.value:g} per {rule.per_days.value:g} days {whose}"
            if key == "max_sessions" and value > limit.value:
                message = f"{show(value)} sessions is more than the policy's {policy_rule}"
            elif key == "per_days" and value < limit.value:
                message = (
                    f"a window of {show(value)} days is shorter than the policy's "
                    f"{limit.value:g} days ({policy_rule})"
                )
            else:
                continue
            looser = True
            check.add(path, message, policy.cite(limit))
        if not looser and value > high:
            check.add(path, f"must be from 1 to {high}, got {show(value)}")
        elif not looser:
            values[key] = value
    if len(values) != 2:
        return None
    return Schedule(values["max_sessions"], values["per_days"])


def _sequencing(check: _Checker, raw: Any, kind: DeviceKindName) -> Sequencing | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        check.add("sequencing", "must be a table")
        return None
    if kind is not DeviceKindName.LED_MASK:
        check.add("sequencing", "only an LED routine can be set to follow a massage")
    check.unknown_keys(raw, {"after", "within_min", "required"}, "sequencing")
    after = raw.get("after")
    if after != "massage":
        check.add("sequencing.after", f'only "massage" is supported, got {show(after)}')
    within = check.number(
        raw, "within_min", "sequencing", low=1.0, high=MAX_SEQUENCING_WITHIN_MIN, default=60.0
    )
    required = raw.get("required", False)
    if not isinstance(required, bool):
        check.add("sequencing.required", f"must be true or false, got {show(required)}")
        required = False
    if within is None:
        return None
    return Sequencing("massage", within, required)


def _massage_totals(check: _Checker, steps: list[MassageStep]) -> None:
    """Caps over the whole routine: session length, and per zone (per side on a sided
    zone) the contact time and the number of passes."""
    policy = check.policy
    total_s = sum(s.contact_time_s for s in steps)
    cap = policy.massage_length_cap_s
    if total_s > cap.value:
        check.add(
            "steps", f"total contact time {total_s:g} s is above the session cap", policy.cite(cap)
        )
    contact_s: dict[str, float] = {}
    passes: dict[str, int] = {}
    reported: set[tuple[str, str]] = set()
    for number, step in enumerate(steps, start=1):
        limits = policy.zones[step.policy_zone]
        each = "per side per session" if step.policy_zone in SIDED_ZONES else "per session"
        contact_s[step.zone] = contact_s.get(step.zone, 0.0) + step.contact_time_s
        passes[step.zone] = passes.get(step.zone, 0) + 1
        session_cap = limits.session_cap_s
        if contact_s[step.zone] > session_cap.value and (step.zone, "time") not in reported:
            reported.add((step.zone, "time"))
            on_zone = [s.contact_time_s for s in steps if s.zone == step.zone]
            check.add(
                f"steps[{number}].contact_time_s",
                f"{sum(on_zone):g} s on {step.zone} in this routine is above the "
                f"{session_cap.value:g} s cap {each}",
                policy.cite(session_cap),
            )
        passes_cap = limits.passes_cap
        if (
            passes_cap is not None
            and passes[step.zone] > passes_cap.value
            and (step.zone, "passes") not in reported
        ):
            reported.add((step.zone, "passes"))
            check.add(
                f"steps[{number}].zone",
                f"{_ordinal(passes[step.zone])} pass on {step.zone}: at most "
                f"{passes_cap.value:g} {each}",
                policy.cite(passes_cap),
            )


def _led_totals(check: _Checker, steps: list[LedStep]) -> None:
    policy = check.policy
    total_s = sum(s.duration_s for s in steps)
    if total_s > policy.led_length_cap_s.value:
        check.add(
            "steps",
            f"total light time {total_s:g} s is above the session cap",
            policy.cite(policy.led_length_cap_s),
        )
    for channel in LED_CHANNELS:
        dose = sum(s.dose_j_cm2(channel) for s in steps)
        cap = policy.led[channel].dose_cap_session_j_cm2
        if dose > cap.value:
            check.add(
                "steps",
                f"{channel.replace('_', '-')} dose {dose:.1f} J/cm² is above the per-session cap "
                f"of {cap.value:g} J/cm²",
                policy.cite(cap),
            )
