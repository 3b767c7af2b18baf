"""The safety policy: per-zone pressure and time caps, LED dose caps, temperature levels,
flicker band, session caps, cool-downs after treatments and routine frequency rules.

Pure: :func:`parse_policy` takes TOML text and returns a validated, frozen
:class:`SafetyPolicy`, or raises :class:`PolicyError` listing every problem with its
place in the file. Every limit must name a key of ``[sources]`` (the original paper,
standard or manual), so that a reviewer can trace each number. ``docs/policy.md``
describes the format; the shipped default is ``devicebridge/data/default_policy.toml``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from devicebridge.core.tomlpath import Problem, locate
from devicebridge.errors import PolicyError as PolicyError  # raised here; importable from here

POLICY_ZONES: Final = (
    "forehead",
    "eye_area",
    "cheek",
    "nasolabial",
    "jawline",
    "chin",
    "neck",
    "masseter",
)
LED_CHANNELS: Final = ("red", "near_infrared", "blue")
TREATMENTS: Final = ("botulinum_toxin", "filler", "tissue_stimulator", "mesotherapy")


@dataclass(frozen=True, slots=True)
class Limit:
    value: float
    source: str  # key of SafetyPolicy.sources
    path: str  # where it is defined, e.g. "zones.eye_area.cap_kpa"


@dataclass(frozen=True, slots=True)
class Band:
    min: float
    max: float
    source: str
    path: str

    def contains(self, value: float) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True, slots=True)
class ZoneLimits:
    band_kpa: Band
    cap_kpa: Limit
    pass_cap_s: Limit
    rest_after_pass_s: Limit | None = None
    passes_cap: Limit | None = None


@dataclass(frozen=True, slots=True)
class LedChannelLimits:
    wavelength_nm: Band
    irradiance_cap_mw_cm2: Limit
    dose_cap_session_j_cm2: Limit
    dose_cap_day_j_cm2: Limit


@dataclass(frozen=True, slots=True)
class Cooldown:
    massage_block_h: Limit
    facial_block_h: Limit | None = None


@dataclass(frozen=True, slots=True)
class FrequencyRule:
    max_sessions: Limit
    per_days: Limit


@dataclass(frozen=True)
class SafetyPolicy:
    name: str
    version: int
    sources: Mapping[str, str]
    zones: Mapping[str, ZoneLimits]
    massage_length_cap_s: Limit
    led_length_cap_s: Limit
    no_contact_pause_s: Limit
    pressure_cap_events_before_stop: Limit
    led: Mapping[str, LedChannelLimits]
    flicker_forbidden_hz: Band
    temperature_warn_c: Limit
    temperature_stop_c: Limit
    cooldowns: Mapping[str, Cooldown]
    frequency: Mapping[str, FrequencyRule] = field(default_factory=dict)

    def cite(self, limit: Limit | Band) -> str:
        """``"zones.eye_area.cap_kpa = 4.0, source: [E] ..."`` for messages."""
        shown = f"{limit.value:g}" if isinstance(limit, Limit) else f"{limit.min:g}..{limit.max:g}"
        return f"{limit.path} = {shown}, source: {self.sources.get(limit.source, limit.source)}"


def policy_zone(zone_name: str) -> str:
    """Policy zone of a routine or protocol zone name (``cheek_left`` -> ``cheek``)."""
    for suffix in ("_left", "_right"):
        if zone_name.endswith(suffix):
            return zone_name[: -len(suffix)]
    return zone_name


class _Reader:
    """Collects every problem instead of stopping at the first."""

    def __init__(self, text: str, sources: Mapping[str, Any]) -> None:
        self.text = text
        self.sources = sources
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message, locate(self.text, path)))

    def table(self, data: Mapping[str, Any], path: str) -> Mapping[str, Any]:
        value = _get(data, path)
        if not isinstance(value, dict):
            self.problem(path, "missing table" if value is None else "must be a table")
            return {}
        return value

    def _source(self, entry: Mapping[str, Any], path: str) -> str:
        source = entry.get("source")
        if not isinstance(source, str) or not source:
            self.problem(path, 'names no source (add source = "<key of [sources]>")')
            return ""
        if source not in self.sources:
            self.problem(path, f"source {source!r} is not a key of [sources]")
        return source

    def limit(self, data: Mapping[str, Any], path: str, *, required: bool = True) -> Limit | None:
        entry = _get(data, path)
        if entry is None and not required:
            return None
        if not isinstance(entry, dict):
            self.problem(
                path, "missing" if entry is None else "must be { value = ..., source = ... }"
            )
            return None
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(path, "needs a numeric value")
            return None
        if value < 0:
            self.problem(path, f"must not be negative (got {value})")
        return Limit(float(value), self._source(entry, path), path)

    def band(self, data: Mapping[str, Any], path: str) -> Band | None:
        entry = _get(data, path)
        if not isinstance(entry, dict):
            self.problem(path, "missing" if entry is None else "must be { min, max, source }")
            return None
        low, high = entry.get("min"), entry.get("max")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            self.problem(path, "needs numeric min and max")
            return None
        assert isinstance(low, int | float)
        assert isinstance(high, int | float)
        if low > high:
            self.problem(path, f"min {low} is above max {high}")
        return Band(float(low), float(high), self._source(entry, path), path)


def _get(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_policy(text: str, *, label: str = "policy") -> SafetyPolicy:
    """Parse and validate a policy; raise :class:`PolicyError` with every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(label, [Problem("(file)", f"not valid TOML: {exc}")]) from exc
    sources = data.get("sources")
    reader = _Reader(text, sources if isinstance(sources, dict) else {})
    if not isinstance(sources, dict) or not sources:
        reader.problem("sources", "missing: every limit must name a source listed here")
    header = reader.table(data, "policy")
    name = header.get("name", "")
    version = header.get("version", 0)
    if not isinstance(name, str) or not name:
        reader.problem("policy.name", "missing")
    if not isinstance(version, int) or version < 1:
        reader.problem("policy.version", "must be a positive integer")

    zones: dict[str, ZoneLimits] = {}
    for zone in POLICY_ZONES:
        base = f"zones.{zone}"
        band = reader.band(data, f"{base}.band_kpa")
        cap = reader.limit(data, f"{base}.cap_kpa")
        pass_cap = reader.limit(data, f"{base}.pass_cap_s")
        rest = reader.limit(data, f"{base}.rest_after_pass_s", required=False)
        passes = reader.limit(data, f"{base}.passes_cap", required=False)
        if band and cap and band.max > cap.value:
            reader.problem(
                f"{base}.band_kpa", f"band max {band.max:g} is above the cap {cap.value:g}"
            )
        if band and cap and pass_cap:
            zones[zone] = ZoneLimits(band, cap, pass_cap, rest, passes)
    for extra in set(reader.table(data, "zones")) - set(POLICY_ZONES):
        reader.problem(f"zones.{extra}", f"unknown zone; known: {', '.join(POLICY_ZONES)}")

    led: dict[str, LedChannelLimits] = {}
    for channel in LED_CHANNELS:
        base = f"led.{channel}"
        wavelength = reader.band(data, f"{base}.wavelength_nm")
        irradiance = reader.limit(data, f"{base}.irradiance_cap_mw_cm2")
        per_session = reader.limit(data, f"{base}.dose_cap_session_j_cm2")
        per_day = reader.limit(data, f"{base}.dose_cap_day_j_cm2")
        if per_session and per_day and per_session.value > per_day.value:
            reader.problem(f"{base}.dose_cap_session_j_cm2", "is above the daily cap")
        if wavelength and irradiance and per_session and per_day:
            led[channel] = LedChannelLimits(wavelength, irradiance, per_session, per_day)

    cooldowns: dict[str, Cooldown] = {}
    for treatment in TREATMENTS:
        massage = reader.limit(data, f"cooldowns.{treatment}.massage_block_h")
        facial = reader.limit(data, f"cooldowns.{treatment}.facial_block_h", required=False)
        if massage:
            cooldowns[treatment] = Cooldown(massage, facial)

    frequency: dict[str, FrequencyRule] = {}
    for category in reader.table(data, "frequency") if "frequency" in data else {}:
        max_sessions = reader.limit(data, f"frequency.{category}.max_sessions")
        per_days = reader.limit(data, f"frequency.{category}.per_days")
        if max_sessions and per_days:
            frequency[category] = FrequencyRule(max_sessions, per_days)

    flicker = reader.band(data, "led.flicker.forbidden_hz")
    warn = reader.limit(data, "temperature.warn_c")
    stop = reader.limit(data, "temperature.stop_c")
    if warn and stop and warn.value > stop.value:
        reader.problem("temperature.warn_c", f"warn level {warn.value:g} is above the stop level")
    massage_cap = reader.limit(data, "session.massage_length_cap_s")
    led_cap = reader.limit(data, "session.led_length_cap_s")
    no_contact = reader.limit(data, "session.no_contact_pause_s")
    cap_events = reader.limit(data, "session.pressure_cap_events_before_stop")
    if cap_events is not None and (
        cap_events.value < 1 or cap_events.value != int(cap_events.value)
    ):
        reader.problem("session.pressure_cap_events_before_stop", "must be a whole number >= 1")

    if reader.problems:
        raise PolicyError(label, reader.problems)
    # No problems means every required entry was read.
    assert flicker is not None
    assert warn is not None
    assert stop is not None
    assert massage_cap is not None
    assert led_cap is not None
    assert no_contact is not None
    assert cap_events is not None
    return SafetyPolicy(
        name=str(name),
        version=int(version),
        sources=dict(reader.sources),
        zones=zones,
        massage_length_cap_s=massage_cap,
        led_length_cap_s=led_cap,
        no_contact_pause_s=no_contact,
        pressure_cap_events_before_stop=cap_events,
        led=led,
        flicker_forbidden_hz=flicker,
        temperature_warn_c=warn,
        temperature_stop_c=stop,
        cooldowns=cooldowns,
        frequency=frequency,
    )


def default_policy_text() -> str:
    """The shipped default policy (package data; never read from outside the package)."""
    return (resources.files("devicebridge") / "data" / "default_policy.toml").read_text("utf-8")


def default_policy() -> SafetyPolicy:
    return parse_policy(default_policy_text(), label="default_policy.toml")
