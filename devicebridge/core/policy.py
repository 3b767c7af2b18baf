"""The safety policy: per-zone pressure and time caps, LED dose caps, temperature levels,
flicker band, session caps, cool-downs after treatments, routine categories and how often
routines of a category may run.

Pure: :func:`parse_policy` takes TOML text and returns a validated, frozen
:class:`SafetyPolicy`, or raises :class:`~devicebridge.errors.PolicyError` listing every
problem with its place in the file. Every limit must name a key of ``[sources]`` (the
original paper, standard or manual), so that a reviewer can trace each number; every number
is finite and in the range ``docs/policy.md`` documents, and a misspelt key is an error
(a typo must never silently drop a limit). The shipped default is
``devicebridge/data/default_policy.toml``.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from devicebridge.core.tomlpath import Problem, is_real, locate, number_problem, show
from devicebridge.errors import PolicyError as PolicyError  # raised here; importable from here
from protocols.constants import (
    CENTI_J_CM2_PER_J_CM2,
    CENTI_MW_CM2_PER_MW_CM2,
    DAPA_PER_KPA,
    DECI_HZ_PER_HZ,
    DS_PER_S,
    MAX_INTENSITY_LEVEL,
    MAX_PROGRAM_STEPS,
    U16_MAX,
)

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
# Zones with a left and a right side: their limits apply to each side on its own.
SIDED_ZONES: Final = frozenset({"eye_area", "cheek", "nasolabial", "jawline", "masseter"})
LED_CHANNELS: Final = ("red", "near_infrared", "blue")
TREATMENTS: Final = ("botulinum_toxin", "filler", "tissue_stimulator", "mesotherapy")

# What a device program can carry (protocols.program: unsigned 16-bit fields in the units
# named there): a policy limit beyond it could not be handed to a device.
WIRE_MAX_PRESSURE_KPA: Final = U16_MAX / DAPA_PER_KPA
WIRE_MAX_CONTACT_S: Final = U16_MAX / DS_PER_S
WIRE_MAX_SESSION_S: Final = U16_MAX  # the program header's session cap, whole seconds
WIRE_MAX_IRRADIANCE_MW_CM2: Final = U16_MAX / CENTI_MW_CM2_PER_MW_CM2
WIRE_MAX_DOSE_J_CM2: Final = U16_MAX / CENTI_J_CM2_PER_J_CM2
WIRE_MAX_PULSE_HZ: Final = U16_MAX / DECI_HZ_PER_HZ

# Sanity ranges of a policy file's numbers (docs/policy.md, "Ranges"). They are not safety
# limits (the policy's own values are) but bounds outside which a value is a mistake.
# No facial zone may be pressed at or above the masseter's pressure pain threshold of
# healthy adults (about 173 kPa, Sarwono 2019).
MAX_PRESSURE_CAP_KPA: Final = 173.0
# Time caps: a step lasts at least 1 s; an hour is far past any facial session (10-20 min).
MIN_TIME_CAP_S: Final = 1.0
MAX_TIME_CAP_S: Final = 3600.0
# Off the skin for over a minute with the motor running is no pause rule at all.
MAX_NO_CONTACT_PAUSE_S: Final = 60.0
# Guidance by time: device manuals cue a move every 15-30 s (TheraFace PRO 15 s, FOREO
# ESPADA 30 s per spot); a cue more often than every 5 s, or rarer than a minute, is no cue.
MIN_MOVE_CUE_INTERVAL_S: Final = 5.0
MAX_MOVE_CUE_INTERVAL_S: Final = 60.0
MAX_CAP_EVENTS: Final = 10
# Skin temperature levels: the forehead skin baseline is about 33 C; heat pain starts at
# 42-45 C (IEC 60601-1 allows 43 C for long contact).
MIN_TEMPERATURE_C: Final = 30.0
MAX_TEMPERATURE_C: Final = 45.0
# LED wavelengths: from UV-A to short-wave infrared covers every light a mask can hold.
MIN_WAVELENGTH_NM: Final = 200.0
MAX_WAVELENGTH_NM: Final = 1500.0
MAX_COOLDOWN_H: Final = 24.0 * 366  # a year
MAX_SESSIONS_PER_WINDOW: Final = 100
MAX_FREQUENCY_WINDOW_DAYS: Final = 366  # a year: admission reads this far back

_CATEGORY_SEPARATORS: Final = re.compile(r"[\s\-_]+")
_CATEGORY_NAME: Final = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")
_LIMIT_KEYS: Final = frozenset({"value", "source"})
_BAND_KEYS: Final = frozenset({"min", "max", "source"})
_TOP_KEYS: Final = frozenset(
    {
        "policy",
        "sources",
        "zones",
        "session",
        "led",
        "temperature",
        "cooldowns",
        "categories",
        "frequency",
    }
)


@functools.lru_cache(maxsize=1024)  # a few names, compared for every past session
def canonical_category(name: str) -> str:
    """The form a category is matched in: lower case, runs of spaces, hyphens and
    underscores as one underscore (``"LED red near-infrared"`` ->
    ``"led_red_near_infrared"``)."""
    return _CATEGORY_SEPARATORS.sub("_", name.strip().casefold()).strip("_")


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
    pass_cap_s: Limit  # effective contact per pass
    session_cap_s: Limit  # effective contact per session, per side on a sided zone
    intensity_cap: Limit  # highest motor level (of a routine's 1-10) on the zone
    rest_after_pass_s: Limit | None = None
    passes_cap: Limit | None = None  # passes per session, per side on a sided zone


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
    """At most ``max_sessions`` sessions of ``category`` in any ``per_days`` days."""

    category: str  # canonical
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
    move_cue_interval_s: Limit  # guidance by time: a cue to move on within a zone
    pressure_cap_events_before_stop: Limit
    frequency_count_fraction: Limit
    led: Mapping[str, LedChannelLimits]
    flicker_forbidden_hz: Band
    temperature_warn_c: Limit
    temperature_stop_c: Limit
    cooldowns: Mapping[str, Cooldown]
    frequency: Mapping[str, FrequencyRule] = field(default_factory=dict)  # canonical keys
    categories_without_rule: frozenset[str] = frozenset()  # canonical

    def cite(self, limit: Limit | Band) -> str:
        """``"zones.eye_area.cap_kpa = 4.0, source: [E] ..."`` for messages."""
        shown = f"{limit.value:g}" if isinstance(limit, Limit) else f"{limit.min:g}..{limit.max:g}"
        return f"{limit.path} = {shown}, source: {self.sources.get(limit.source, limit.source)}"

    @property
    def known_categories(self) -> tuple[str, ...]:
        """Every category the policy knows, with or without a frequency rule (sorted)."""
        return tuple(sorted(set(self.frequency) | self.categories_without_rule))

    def knows_category(self, category: str) -> bool:
        canonical = canonical_category(category)
        return canonical in self.frequency or canonical in self.categories_without_rule

    def frequency_rules(self, category: str) -> tuple[FrequencyRule, ...]:
        """The rules sessions of ``category`` are held to: its own rule, none for a known
        category without one, and every rule at once for a category the policy does not
        know (the strictest answer: a misspelt category never escapes a limit)."""
        canonical = canonical_category(category)
        rule = self.frequency.get(canonical)
        if rule is not None:
            return (rule,)
        if canonical in self.categories_without_rule:
            return ()
        return tuple(self.frequency.values())

    def counts_with(self, category: str, other: str) -> bool:
        """Whether a session of ``other`` counts toward the frequency of ``category``:
        the same canonical category, or both unknown to the policy (unknown categories
        count together, so renaming a routine does not start a fresh count)."""
        mine, theirs = canonical_category(category), canonical_category(other)
        if mine == theirs:
            return True
        return not self.knows_category(mine) and not self.knows_category(theirs)


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

    def table(self, data: Mapping[str, Any], path: str, *, required: bool = True) -> dict[str, Any]:
        value = _get(data, path)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.problem(path, "missing table" if value is None else "must be a table")
            return {}
        return value

    def unknown_keys(self, table: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
        for key in sorted(set(table) - allowed):
            where = f"{path}.{key}" if path else key
            self.problem(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def _source(self, entry: Mapping[str, Any], path: str) -> str:
        source = entry.get("source")
        if not isinstance(source, str) or not source:
            self.problem(path, 'names no source (add source = "<key of [sources]>")')
            return ""
        if source not in self.sources:
            self.problem(path, f"source {show(source)} is not a key of [sources]")
        return source

    def limit(
        self,
        data: Mapping[str, Any],
        path: str,
        low: float,
        high: float,
        *,
        required: bool = True,
        whole: bool = False,
        above_low: bool = False,
    ) -> Limit | None:
        """``{ value = ..., source = ... }`` with a finite value in ``low..high``."""
        entry = _get(data, path)
        if entry is None and not required:
            return None
        if not isinstance(entry, dict):
            self.problem(
                path, "missing" if entry is None else "must be { value = ..., source = ... }"
            )
            return None
        self.unknown_keys(entry, _LIMIT_KEYS, path)
        source = self._source(entry, path)
        value = entry.get("value")
        if value is None:
            self.problem(path, "missing value")
            return None
        problem = number_problem(value, low, high, whole=whole, above_low=above_low)
        if problem is not None:
            self.problem(path, problem)
            return None
        return Limit(float(value), source, path)

    def band(self, data: Mapping[str, Any], path: str, low: float, high: float) -> Band | None:
        """``{ min = ..., max = ..., source = ... }`` with finite ends in ``low..high``."""
        entry = _get(data, path)
        if not isinstance(entry, dict):
            self.problem(path, "missing" if entry is None else "must be { min, max, source }")
            return None
        self.unknown_keys(entry, _BAND_KEYS, path)
        source = self._source(entry, path)
        ends: list[float] = []
        for key in ("min", "max"):
            value = entry.get(key)
            problem = "missing" if value is None else number_problem(value, low, high)
            if problem is not None:
                self.problem(path, f"{key} {problem}")
            elif is_real(value):
                ends.append(float(value))
        if len(ends) != 2:
            return None
        if ends[0] > ends[1]:
            self.problem(path, f"min {ends[0]:g} is above max {ends[1]:g}")
        return Band(ends[0], ends[1], source, path)


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
    reader.unknown_keys(data, _TOP_KEYS, "")
    if not isinstance(sources, dict) or not sources:
        reader.problem("sources", "missing: every limit must name a source listed here")
    elif bad := sorted(k for k, v in sources.items() if not isinstance(v, str) or not v.strip()):
        for key in bad:
            reader.problem(f"sources.{key}", "must be the text of the source")
    header = reader.table(data, "policy")
    reader.unknown_keys(header, frozenset({"name", "version"}), "policy")
    name = header.get("name", "")
    version = header.get("version", 0)
    if not isinstance(name, str) or not name:
        reader.problem("policy.name", "missing")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        reader.problem("policy.version", f"must be a positive integer, got {show(version)}")

    zones = _zones(reader, data)
    led = _led(reader, data)
    cooldowns = _cooldowns(reader, data)
    frequency, without_rule = _categories(reader, data)

    flicker = reader.band(data, "led.flicker.forbidden_hz", 0.0, WIRE_MAX_PULSE_HZ)
    temperature = reader.table(data, "temperature")
    reader.unknown_keys(temperature, frozenset({"warn_c", "stop_c"}), "temperature")
    warn = reader.limit(data, "temperature.warn_c", MIN_TEMPERATURE_C, MAX_TEMPERATURE_C)
    stop = reader.limit(data, "temperature.stop_c", MIN_TEMPERATURE_C, MAX_TEMPERATURE_C)
    if warn and stop and warn.value > stop.value:
        reader.problem("temperature.warn_c", f"warn level {warn.value:g} is above the stop level")
    session = reader.table(data, "session")
    reader.unknown_keys(
        session,
        frozenset(
            {
                "massage_length_cap_s",
                "led_length_cap_s",
                "no_contact_pause_s",
                "move_cue_interval_s",
                "pressure_cap_events_before_stop",
                "frequency_count_fraction",
            }
        ),
        "session",
    )
    massage_cap = reader.limit(data, "session.massage_length_cap_s", MIN_TIME_CAP_S, MAX_TIME_CAP_S)
    led_cap = reader.limit(data, "session.led_length_cap_s", MIN_TIME_CAP_S, MAX_TIME_CAP_S)
    # The device counts this pause in 0.1 s: anything shorter could not be carried.
    no_contact = reader.limit(
        data, "session.no_contact_pause_s", 1 / DS_PER_S, MAX_NO_CONTACT_PAUSE_S
    )
    move_cue = reader.limit(
        data, "session.move_cue_interval_s", MIN_MOVE_CUE_INTERVAL_S, MAX_MOVE_CUE_INTERVAL_S
    )
    cap_events = reader.limit(
        data, "session.pressure_cap_events_before_stop", 1, MAX_CAP_EVENTS, whole=True
    )
    count_fraction = reader.limit(
        data, "session.frequency_count_fraction", 0.0, 1.0, above_low=True
    )

    if reader.problems:
        raise PolicyError(label, reader.problems)
    # No problems means every required entry was read.
    assert flicker is not None
    assert warn is not None
    assert stop is not None
    assert massage_cap is not None
    assert led_cap is not None
    assert no_contact is not None
    assert move_cue is not None
    assert cap_events is not None
    assert count_fraction is not None
    return SafetyPolicy(
        name=str(name),
        version=int(version),
        sources=dict(reader.sources),
        zones=zones,
        massage_length_cap_s=massage_cap,
        led_length_cap_s=led_cap,
        no_contact_pause_s=no_contact,
        move_cue_interval_s=move_cue,
        pressure_cap_events_before_stop=cap_events,
        frequency_count_fraction=count_fraction,
        led=led,
        flicker_forbidden_hz=flicker,
        temperature_warn_c=warn,
        temperature_stop_c=stop,
        cooldowns=cooldowns,
        frequency=frequency,
        categories_without_rule=without_rule,
    )


def _zones(reader: _Reader, data: Mapping[str, Any]) -> dict[str, ZoneLimits]:
    zones: dict[str, ZoneLimits] = {}
    table = reader.table(data, "zones")
    for extra in sorted(set(table) - set(POLICY_ZONES)):
        reader.problem(f"zones.{extra}", f"unknown zone; known: {', '.join(POLICY_ZONES)}")
    allowed = frozenset(
        {
            "band_kpa",
            "cap_kpa",
            "pass_cap_s",
            "session_cap_s",
            "intensity_cap",
            "rest_after_pass_s",
            "passes_cap",
        }
    )
    for zone in POLICY_ZONES:
        base = f"zones.{zone}"
        reader.unknown_keys(reader.table(data, base), allowed, base)
        band = reader.band(data, f"{base}.band_kpa", 0.0, MAX_PRESSURE_CAP_KPA)
        cap = reader.limit(data, f"{base}.cap_kpa", 0.0, MAX_PRESSURE_CAP_KPA, above_low=True)
        pass_cap = reader.limit(data, f"{base}.pass_cap_s", MIN_TIME_CAP_S, MAX_TIME_CAP_S)
        session_cap = reader.limit(data, f"{base}.session_cap_s", MIN_TIME_CAP_S, MAX_TIME_CAP_S)
        intensity = reader.limit(data, f"{base}.intensity_cap", 1, MAX_INTENSITY_LEVEL, whole=True)
        rest = reader.limit(data, f"{base}.rest_after_pass_s", 0.0, MAX_TIME_CAP_S, required=False)
        # A pass is at least one step: a program holds at most MAX_PROGRAM_STEPS.
        passes = reader.limit(
            data, f"{base}.passes_cap", 1, MAX_PROGRAM_STEPS, required=False, whole=True
        )
        if band and cap and band.max > cap.value:
            reader.problem(
                f"{base}.band_kpa", f"band max {band.max:g} is above the cap {cap.value:g}"
            )
        if band and cap and pass_cap and session_cap and intensity:
            zones[zone] = ZoneLimits(band, cap, pass_cap, session_cap, intensity, rest, passes)
    return zones


def _led(reader: _Reader, data: Mapping[str, Any]) -> dict[str, LedChannelLimits]:
    led: dict[str, LedChannelLimits] = {}
    table = reader.table(data, "led")
    for extra in sorted(set(table) - {*LED_CHANNELS, "flicker"}):
        reader.problem(f"led.{extra}", f"unknown LED channel; known: {', '.join(LED_CHANNELS)}")
    reader.unknown_keys(
        reader.table(data, "led.flicker"), frozenset({"forbidden_hz"}), "led.flicker"
    )
    allowed = frozenset(
        {"wavelength_nm", "irradiance_cap_mw_cm2", "dose_cap_session_j_cm2", "dose_cap_day_j_cm2"}
    )
    for channel in LED_CHANNELS:
        base = f"led.{channel}"
        reader.unknown_keys(reader.table(data, base), allowed, base)
        wavelength = reader.band(
            data, f"{base}.wavelength_nm", MIN_WAVELENGTH_NM, MAX_WAVELENGTH_NM
        )
        irradiance = reader.limit(
            data, f"{base}.irradiance_cap_mw_cm2", 0.0, WIRE_MAX_IRRADIANCE_MW_CM2, above_low=True
        )
        per_session = reader.limit(data, f"{base}.dose_cap_session_j_cm2", 0.0, WIRE_MAX_DOSE_J_CM2)
        per_day = reader.limit(data, f"{base}.dose_cap_day_j_cm2", 0.0, WIRE_MAX_DOSE_J_CM2)
        if per_session and per_day and per_session.value > per_day.value:
            reader.problem(f"{base}.dose_cap_session_j_cm2", "is above the daily cap")
        if wavelength and irradiance and per_session and per_day:
            led[channel] = LedChannelLimits(wavelength, irradiance, per_session, per_day)
    return led


def _cooldowns(reader: _Reader, data: Mapping[str, Any]) -> dict[str, Cooldown]:
    cooldowns: dict[str, Cooldown] = {}
    table = reader.table(data, "cooldowns")
    for extra in sorted(set(table) - set(TREATMENTS)):
        reader.problem(f"cooldowns.{extra}", f"unknown treatment; known: {', '.join(TREATMENTS)}")
    for treatment in TREATMENTS:
        base = f"cooldowns.{treatment}"
        reader.unknown_keys(
            reader.table(data, base), frozenset({"massage_block_h", "facial_block_h"}), base
        )
        massage = reader.limit(data, f"{base}.massage_block_h", 0.0, MAX_COOLDOWN_H)
        facial = reader.limit(data, f"{base}.facial_block_h", 0.0, MAX_COOLDOWN_H, required=False)
        if massage:
            cooldowns[treatment] = Cooldown(massage, facial)
    return cooldowns


def _categories(
    reader: _Reader, data: Mapping[str, Any]
) -> tuple[dict[str, FrequencyRule], frozenset[str]]:
    """``[frequency.CATEGORY]`` rules and ``[categories] without_frequency_rule``."""
    frequency: dict[str, FrequencyRule] = {}
    seen: dict[str, str] = {}  # canonical -> where it was declared

    def declare(name: str, path: str) -> str | None:
        canonical = canonical_category(name)
        if not _CATEGORY_NAME.match(canonical):
            reader.problem(
                path, f"category {show(name)} must be words of letters and digits (e.g. firming)"
            )
            return None
        if canonical in seen:
            reader.problem(path, f"category {canonical!r} is already declared at {seen[canonical]}")
            return None
        seen[canonical] = path
        return canonical

    for category in reader.table(data, "frequency", required=False):
        base = f"frequency.{category}"
        reader.unknown_keys(reader.table(data, base), frozenset({"max_sessions", "per_days"}), base)
        max_sessions = reader.limit(
            data, f"{base}.max_sessions", 1, MAX_SESSIONS_PER_WINDOW, whole=True
        )
        per_days = reader.limit(data, f"{base}.per_days", 1, MAX_FREQUENCY_WINDOW_DAYS, whole=True)
        canonical = declare(category, base)
        if canonical and max_sessions and per_days:
            frequency[canonical] = FrequencyRule(canonical, max_sessions, per_days)

    table = reader.table(data, "categories", required=False)
    reader.unknown_keys(table, frozenset({"without_frequency_rule"}), "categories")
    names = table.get("without_frequency_rule", [])
    without: set[str] = set()
    path = "categories.without_frequency_rule"
    if not isinstance(names, list):
        reader.problem(path, "must be a list of category names")
        names = []
    for name in names:
        if not isinstance(name, str):
            reader.problem(path, f"must hold category names, got {show(name)}")
            continue
        canonical = declare(name, path)
        if canonical:
            without.add(canonical)
    return frequency, frozenset(without)


def default_policy_text() -> str:
    """The shipped default policy (package data; never read from outside the package)."""
    return (resources.files("devicebridge") / "data" / "default_policy.toml").read_text("utf-8")


def default_policy() -> SafetyPolicy:
    return parse_policy(default_policy_text(), label="default_policy.toml")
