"""Routine programs: a TOML file of ordered steps per facial zone, checked against the policy.

Pure: :func:`parse_routine` turns TOML text into a frozen :class:`Routine` or raises
:class:`RoutineError` listing every problem with its place in the file and, where a policy
limit is broken, which rule (and its source) says so. A routine may be stricter than the
policy, never looser. ``docs/routines.md`` describes the format.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy, policy_zone
from devicebridge.core.tomlpath import Problem, locate
from devicebridge.errors import RoutineError as RoutineError  # raised here; importable from here

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
MAX_INTENSITY: Final = 10
J_PER_MJ: Final = 1000.0  # dose J/cm² = irradiance mW/cm² x s / 1000

_ROUTINE_KEYS: Final = {"name", "author", "version", "device_kind", "category", "rationale", "tags"}
_MASSAGE_STEP_KEYS: Final = {
    "zone",
    "contact_time_s",
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


@dataclass(frozen=True, slots=True)
class MassageStep:
    zone: str  # one of MASSAGE_ZONES
    contact_time_s: float  # effective time with the head on the skin
    mode: str
    intensity: int
    pressure_min_kpa: float
    pressure_max_kpa: float
    guidance: str = ""

    @property
    def policy_zone(self) -> str:
        return policy_zone(self.zone)


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
    max_sessions: int
    per_days: float


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
    category: str
    rationale: str
    steps: tuple[Step, ...]
    schedule: Schedule | None = None
    sequencing: Sequencing | None = None
    source_text: str = ""

    @property
    def total_time_s(self) -> float:
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
        low: float = 0.0,
        default: float | None = None,
    ) -> float | None:
        value = table.get(key, default)
        if value is None:
            self.add(f"{path}.{key}", "missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(f"{path}.{key}", f"must be a number, got {type(value).__name__}")
            return None
        if value < low:
            self.add(f"{path}.{key}", f"must be at least {low:g}, got {value:g}")
            return None
        return float(value)

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
    version = str(meta.get("version", ""))
    if not version:
        check.add("routine.version", "missing")
    category = check.text_field(meta, "category", "routine", required=False) or "general"
    rationale = check.text_field(meta, "rationale", "routine", required=False)
    try:
        kind = DeviceKindName(meta.get("device_kind", ""))
    except ValueError:
        check.add("routine.device_kind", 'must be "massager" or "led_mask"')
        kind = DeviceKindName.MASSAGER

    raw_steps = data.get("steps")
    steps: list[Step] = []
    if not isinstance(raw_steps, list) or not raw_steps:
        check.add("steps", "no steps: add [[steps]] tables")
        raw_steps = []
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
    sequencing = _sequencing(check, data.get("sequencing"))
    _whole_routine_limits(check, kind, steps, len(raw_steps))

    if check.problems:
        raise RoutineError(label, check.problems)
    return Routine(
        name, author, version, kind, category, rationale, tuple(steps), schedule, sequencing, text
    )


def _massage_step(check: _Checker, raw: Mapping[str, Any], path: str) -> MassageStep | None:
    policy = check.policy
    check.unknown_keys(raw, _MASSAGE_STEP_KEYS, path)
    zone = raw.get("zone")
    if zone not in MASSAGE_ZONES:
        check.add(f"{path}.zone", f"unknown zone {zone!r}; known: {', '.join(MASSAGE_ZONES)}")
        return None
    limits = policy.zones[policy_zone(zone)]
    contact_s = check.number(raw, "contact_time_s", path, low=1.0)
    if contact_s is not None and contact_s > limits.pass_cap_s.value:
        check.add(
            f"{path}.contact_time_s",
            f"{contact_s:g} s on {zone} is above the {limits.pass_cap_s.value:g} s cap per pass",
            policy.cite(limits.pass_cap_s),
        )
    mode = raw.get("mode", "vibration")
    if mode not in MASSAGE_MODES:
        check.add(f"{path}.mode", f"unknown mode {mode!r}; known: {', '.join(MASSAGE_MODES)}")
    intensity = raw.get("intensity")
    if (
        isinstance(intensity, bool)
        or not isinstance(intensity, int)
        or not 1 <= intensity <= MAX_INTENSITY
    ):
        check.add(f"{path}.intensity", f"must be an integer 1..{MAX_INTENSITY}")
        intensity = 0
    band = raw.get("pressure_kpa")
    low = high = None
    if not isinstance(band, dict):
        check.add(f"{path}.pressure_kpa", "missing: pressure_kpa = { min = ..., max = ... }")
    else:
        low = check.number(band, "min", f"{path}.pressure_kpa")
        high = check.number(band, "max", f"{path}.pressure_kpa")
        if low is not None and high is not None:
            if low >= high:
                check.add(f"{path}.pressure_kpa", f"min {low:g} must be below max {high:g}")
            if high > limits.cap_kpa.value:
                check.add(
                    f"{path}.pressure_kpa",
                    f"band goes up to {high:g} kPa, above the "
                    f"{policy_zone(zone).replace('_', '-')} cap of {limits.cap_kpa.value:g} kPa",
                    policy.cite(limits.cap_kpa),
                )
    guidance = raw.get("guidance", "")
    if contact_s is None or low is None or high is None or not isinstance(mode, str):
        return None
    return MassageStep(zone, contact_s, mode, int(intensity), low, high, str(guidance))


def _led_step(check: _Checker, raw: Mapping[str, Any], path: str) -> LedStep | None:
    policy = check.policy
    check.unknown_keys(raw, _LED_STEP_KEYS, path)
    levels: dict[str, float] = {}
    for channel in LED_CHANNELS:
        value = check.number(raw, f"{channel}_mw_cm2", path, default=0.0)
        if value is None:
            return None
        cap = policy.led[channel].irradiance_cap_mw_cm2
        if value > cap.value:
            check.add(
                f"{path}.{channel}_mw_cm2",
                f"{value:g} mW/cm² is above the {channel.replace('_', '-')} irradiance cap of "
                f"{cap.value:g} mW/cm²",
                policy.cite(cap),
            )
        levels[channel] = value
    if not any(levels.values()):
        check.add(path, "no channel is lit: set red_mw_cm2, near_infrared_mw_cm2 or blue_mw_cm2")
    duration_s = check.number(raw, "duration_s", path, low=1.0)
    pulse_hz = check.number(raw, "pulse_hz", path, default=0.0)
    flicker = policy.flicker_forbidden_hz
    if pulse_hz and flicker.contains(pulse_hz):
        check.add(
            f"{path}.pulse_hz",
            f"{pulse_hz:g} Hz flicker lies in the forbidden "
            f"{flicker.min:g}-{flicker.max:g} Hz band",
            policy.cite(flicker),
        )
    if duration_s is None or pulse_hz is None:
        return None
    return LedStep(
        levels["red"],
        levels["near_infrared"],
        levels["blue"],
        duration_s,
        pulse_hz,
        str(raw.get("guidance", "")),
    )


def _schedule(check: _Checker, raw: Any, category: str) -> Schedule | None:
    rule = check.policy.frequency.get(category)
    if raw is None:
        if rule is None:
            return None
        return Schedule(int(rule.max_sessions.value), rule.per_days.value)
    if not isinstance(raw, dict):
        check.add("schedule", "must be a table")
        return None
    check.unknown_keys(raw, {"max_sessions", "per_days"}, "schedule")
    max_sessions = check.number(raw, "max_sessions", "schedule", low=1.0)
    per_days = check.number(raw, "per_days", "schedule", low=1.0)
    if max_sessions is None or per_days is None:
        return None
    if rule is not None and max_sessions / per_days > rule.max_sessions.value / rule.per_days.value:
        check.add(
            "schedule",
            f"{max_sessions:g} sessions per {per_days:g} days is looser than the policy's "
            f"{rule.max_sessions.value:g} per {rule.per_days.value:g} days for {category!r}",
            check.policy.cite(rule.max_sessions),
        )
    return Schedule(int(max_sessions), per_days)


def _sequencing(check: _Checker, raw: Any) -> Sequencing | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        check.add("sequencing", "must be a table")
        return None
    check.unknown_keys(raw, {"after", "within_min", "required"}, "sequencing")
    after = raw.get("after")
    if after != "massage":
        check.add("sequencing.after", 'only "massage" is supported')
    within = check.number(raw, "within_min", "sequencing", low=1.0, default=60.0)
    required = raw.get("required", False)
    if not isinstance(required, bool):
        check.add("sequencing.required", "must be true or false")
        required = False
    if within is None:
        return None
    return Sequencing("massage", within, required)


def _whole_routine_limits(
    check: _Checker, kind: DeviceKindName, steps: list[Step], declared_steps: int
) -> None:
    policy = check.policy
    if len(steps) != declared_steps:
        return  # step problems are already reported; totals would mislead
    if kind is DeviceKindName.MASSAGER:
        total_s = sum(s.contact_time_s for s in steps if isinstance(s, MassageStep))
        cap = policy.massage_length_cap_s
        if total_s > cap.value:
            check.add(
                "steps",
                f"total contact time {total_s:g} s is above the session cap",
                policy.cite(cap),
            )
        for zone, limits in policy.zones.items():
            if limits.passes_cap is None:
                continue
            passes = sum(1 for s in steps if isinstance(s, MassageStep) and s.policy_zone == zone)
            per_side = passes / 2 if zone == "masseter" else passes
            if per_side > limits.passes_cap.value:
                check.add(
                    "steps",
                    f"{passes} passes on {zone} exceed {limits.passes_cap.value:g} sets per side",
                    policy.cite(limits.passes_cap),
                )
        return
    total_s = sum(s.duration_s for s in steps if isinstance(s, LedStep))
    if total_s > policy.led_length_cap_s.value:
        check.add(
            "steps",
            f"total light time {total_s:g} s is above the session cap",
            policy.cite(policy.led_length_cap_s),
        )
    for channel in LED_CHANNELS:
        dose = sum(s.dose_j_cm2(channel) for s in steps if isinstance(s, LedStep))
        cap = policy.led[channel].dose_cap_session_j_cm2
        if dose > cap.value:
            check.add(
                "steps",
                f"{channel.replace('_', '-')} dose {dose:.1f} J/cm² is above the per-session cap "
                f"of {cap.value:g} J/cm²",
                policy.cite(cap),
            )
