"""The safety policy as properties any way of running routines must keep.

Reusable by every path that takes a routine from outside: a local file here, a signed
program through ``serve`` later. It holds

- strategies: :func:`routine_texts` (arbitrary routines as TOML text: NaN, infinities,
  huge and negative numbers, bools and strings where numbers belong, per-side and repeated
  zones, odd categories and schedules), :func:`runnable_massage_texts` (massage routines
  a short policy accepts) and :func:`hand_scripts` (a simulated hand: arbitrary zones,
  pressures, lifts and gaps);
- :func:`check_routine_text`: refused with a :class:`RoutineError` that names each place
  (line and key path), or accepted and within the policy, and encodable as a device program;
- :func:`check_admissions`: an accepted routine is never admitted more often than the
  policy (and its own schedule) allows, and a refusal's "allowed from" is when it is;
- :func:`check_run`: a :data:`RunRoutine` callable runs a routine under a hand and gives
  back the :class:`RunRecord` (stored telemetry and decisions); the device never exceeded
  the policy: no motor past the stop latency above a zone's cap, contact time per zone per
  pass and per session within the caps, no motor past the session cap or the run's end.

The frequency oracle here is written from ``docs/policy.md`` on its own, not with the
implementation's helpers, so that it can disagree with them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from devicebridge.core.admission import PastSession, check_admission
from devicebridge.core.engine import (
    ZONE_CODES,
    ZONE_NAMES,
)
from devicebridge.core.policy import (
    LED_CHANNELS,
    SafetyPolicy,
    default_policy_text,
    parse_policy,
    policy_zone,
)
from devicebridge.core.routine import (
    MASSAGE_ZONES,
    DeviceKindName,
    LedStep,
    MassageStep,
    Routine,
    parse_routine,
)
from devicebridge.device.program_transfer import program_from_routine
from devicebridge.errors import DeviceBridgeError, RoutineError
from protocols import Zone
from protocols.constants import DECI_HZ_PER_HZ, MAX_INTENSITY_LEVEL
from protocols.program import (
    MAX_PROGRAM_STEPS,
)
from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_FLAG_MOTOR_ON, PRESSURE_KPA_PER_UNIT
from simulators import HandScript, HandSegment

LABEL: Final = "generated.toml"

# --------------------------------------------------------------------------- TOML text

WEIRD: Final[tuple[object, ...]] = (
    math.nan,
    math.inf,
    -math.inf,
    10**400,
    -(10**30),
    2**64,
    -1,
    0,
    -0.0,
    1e-300,
    1e308,
    True,
    False,
    "5",
    [1],
)


def toml_value(value: object) -> str:
    """``value`` as a TOML literal (tables as inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):  # TOML escapes: as JSON's, but DEL too and no surrogates
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def table(header: str, entries: Mapping[str, object]) -> str:
    return f"{header}\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entries.items()) + "\n"


class _Values:
    """Draws a routine's values. Each has good values and bad ones (just past a limit, or
    wrong in kind); a routine is ``valid`` (good ones only: it can still break a cap per
    zone, per session or per day with them), ``edge`` (now and then a bad one) or
    ``hostile`` (often a bad one, or anything a file could hold: NaN, infinities, huge
    integers, bools, strings, arrays)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.mode = draw(st.sampled_from(["valid", "valid", "edge", "hostile"]))

    def __call__(self, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> object:
        roll = self.draw(st.integers(0, 9))
        if self.mode == "edge" and roll == 0:
            return self.draw(bad)
        if self.mode == "hostile" and roll < 4:
            return self.draw(bad if roll < 2 else st.sampled_from(WEIRD))
        return self.draw(good)

    def maybe(self, entries: dict[str, object]) -> dict[str, object]:
        """In a hostile routine, now and then a key left out or a misspelt one added."""
        if self.mode != "hostile" or self.draw(st.integers(0, 5)):
            return entries
        left_out = self.draw(st.sampled_from([None, *entries]))
        kept = {k: v for k, v in entries.items() if k != left_out}
        if left_out is None:
            kept["guidence"] = "typo"
        return kept


def one_of(*values: object) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
CATEGORIES: Final = (
    "firming",
    "Firming",
    " FIRMING ",
    "fir-ming",
    "LED red near-infrared",
    "led-red-near-infrared",
    "drainage",
    "Deep Tissue",
    "relaxation",
    "demo",
    "",
    "   ",
    "---",
)


@st.composite
def routine_texts(draw: st.DrawFn) -> str:
    """Arbitrary routine files, from valid ones near the policy's limits to hostile ones,
    always valid TOML."""
    value = _Values(draw)
    kind = value(one_of("massager", "led_mask"), one_of("toaster", "Massager"))
    meta: dict[str, object] = {
        "name": value(st.just("generated") | texts, one_of("", 5)),
        "author": "hypothesis",
        "version": value(one_of("1", 1, 1.5), one_of(math.nan, True, "")),
        "device_kind": kind,
        "category": value(one_of(*CATEGORIES[:-1]) | texts, one_of("---", 7)),
    }
    parts = [table("[routine]", value.maybe(meta))]
    if draw(st.booleans()):
        schedule = {
            "max_sessions": value(one_of(1, 2), one_of(0, 3, 1000, 2.0)),
            "per_days": value(one_of(1, 7, 14, 366), one_of(0, 3, 367, 3500, 7.5)),
        }
        parts.append(table("[schedule]", value.maybe(schedule)))
    if kind == "led_mask" and draw(st.booleans()):
        sequencing = {
            "after": value(st.just("massage"), one_of("led", "")),
            "within_min": value(one_of(1, 60, 1440) | st.floats(1, 1440), one_of(0, 1441, 3000)),
            "required": value(st.booleans(), one_of("yes", 1)),
        }
        parts.append(table("[sequencing]", value.maybe(sequencing)))
    # A few zones, drawn again and again: repeated zones and sides reach the session caps.
    pool = draw(st.lists(st.sampled_from(MASSAGE_ZONES), min_size=1, max_size=4))
    steps = []
    for _ in range(draw(st.integers(1, 8) | one_of(0, 12))):
        step = _led_step(value) if kind == "led_mask" else _massage_step(value, pool)
        steps.append(table("[[steps]]", value.maybe(step)))
    if steps and not draw(st.integers(0, 15)):  # as many steps as a program holds, or one more
        steps = [steps[0]] * draw(one_of(MAX_PROGRAM_STEPS, MAX_PROGRAM_STEPS + 1))
    return "".join(parts + steps)


def _massage_step(value: _Values, pool: Sequence[str]) -> dict[str, object]:
    low = value(one_of(0.5, 1.0, 2.0, 3.0), one_of(20.0, 100.0, -1.0))
    width = value.draw(one_of(0.02, 0.5, 1.0, 2.0, 9.0))
    plain = isinstance(low, float | int) and not isinstance(low, bool) and abs(low) < 1e9
    band = {"min": low, "max": value(st.just(low + width if plain else 5.0), one_of(0.0, 1e9))}
    return {
        "zone": value(st.sampled_from(list(pool)), one_of("nose", "Cheek_Left")),
        "contact_time_s": value(one_of(1, 10, 30, 45) | st.floats(1, 45), one_of(0.5, 60.01, 90)),
        "mode": value(one_of("vibration", "percussion", "pulse"), one_of("laser", "")),
        "intensity": value(st.integers(1, MAX_INTENSITY_LEVEL), one_of(0, 11, 5.0)),
        "pressure_kpa": value(st.just(band), one_of({"min": low}, 5.0)),
    }


def _led_step(value: _Values) -> dict[str, object]:
    def irradiance() -> object:
        return value(one_of(0.0, 0.0, 0.01, 10.0, 15.0, 30.0, 40.0), one_of(0.004, 61.0, 100.0))

    return {
        "red_mw_cm2": irradiance(),
        "near_infrared_mw_cm2": irradiance(),
        "blue_mw_cm2": irradiance(),
        "duration_s": value(one_of(1, 60, 300, 600) | st.floats(1, 600), one_of(0.5, 1201)),
        "pulse_hz": value(
            one_of(0, 0, 0.04, 1.0, 2.9, 61, 100, 6553.5),
            one_of(2.95, 2.96, 3, 30, 60, 60.04, 6553.6, 7000),
        ),
    }


# --------------------------------------------------------------------------- validation


def check_routine_text(text: str, policy: SafetyPolicy) -> Routine | None:
    """Refused with the place of every problem, or accepted, within the policy and
    encodable as a device program (then returned)."""
    try:
        routine = parse_routine(text, policy, label=LABEL)
    except RoutineError as error:
        assert_names_every_place(error, text)
        return None
    assert_routine_within_policy(routine, policy)
    program_from_routine(routine, policy).encode()
    return routine


def assert_names_every_place(error: RoutineError, text: str) -> None:
    """A DeviceBridgeError whose every problem has a key path and, when that place is in
    the file, its line, as the message shows them."""
    assert isinstance(error, DeviceBridgeError)
    assert error.problems
    rendered = str(error)
    for problem in error.problems:
        assert problem.path
        assert problem.message
        top = re.split(r"[.\[]", problem.path)[0]
        if re.search(rf"^\[*{re.escape(top)}\b|^{re.escape(top)}\s*=", text, re.MULTILINE):
            assert problem.line is not None, problem
            assert f"{LABEL}:{problem.line}: {problem.path}: " in rendered


def assert_routine_within_policy(routine: Routine, policy: SafetyPolicy) -> None:
    assert 1 <= len(routine.steps) <= MAX_PROGRAM_STEPS
    if routine.device_kind is DeviceKindName.MASSAGER:
        steps = [s for s in routine.steps if isinstance(s, MassageStep)]
        assert len(steps) == len(routine.steps)
        assert sum(s.contact_time_s for s in steps) <= policy.massage_length_cap_s.value
        for step in steps:
            limits = policy.zones[step.policy_zone]
            assert 1 <= step.contact_time_s <= limits.pass_cap_s.value
            assert 0 <= step.pressure_min_kpa < step.pressure_max_kpa <= limits.cap_kpa.value
            assert step.pressure_max_kpa - step.pressure_min_kpa >= 0.02 - 1e-12
            assert 1 <= step.intensity <= limits.intensity_cap.value <= MAX_INTENSITY_LEVEL
        for zone in {s.zone for s in steps}:  # per routine zone: per side
            on_zone = [s for s in steps if s.zone == zone]
            limits = policy.zones[policy_zone(zone)]
            assert sum(s.contact_time_s for s in on_zone) <= limits.session_cap_s.value
            if limits.passes_cap is not None:
                assert len(on_zone) <= limits.passes_cap.value
    else:
        led = [s for s in routine.steps if isinstance(s, LedStep)]
        assert len(led) == len(routine.steps)
        assert sum(s.duration_s for s in led) <= policy.led_length_cap_s.value
        flicker = policy.flicker_forbidden_hz
        for step in led:
            assert step.duration_s >= 1
            assert math.isfinite(step.pulse_hz)
            sent = round(step.pulse_hz * DECI_HZ_PER_HZ) / DECI_HZ_PER_HZ
            if step.pulse_hz:
                assert not flicker.contains(step.pulse_hz)
                assert not flicker.contains(sent) or sent == 0
            for channel in LED_CHANNELS:
                level = step.irradiance_mw_cm2(channel)
                assert 0 <= level <= policy.led[channel].irradiance_cap_mw_cm2.value
        for channel in LED_CHANNELS:
            dose = routine.dose_j_cm2(channel)
            assert dose <= policy.led[channel].dose_cap_session_j_cm2.value + 1e-9
    if routine.schedule is not None:
        for rule in rules_for(policy, routine.category):
            assert routine.schedule.max_sessions <= rule[0]
            assert routine.schedule.per_days >= rule[1]
        assert isinstance(routine.schedule.max_sessions, int)
        assert isinstance(routine.schedule.per_days, int)


# --------------------------------------------------------------------------- admission


def canonical(category: str) -> str:
    return re.sub(r"[\s_-]+", "_", category.strip().lower()).strip("_")


def rules_for(policy: SafetyPolicy, category: str) -> list[tuple[int, int]]:
    """(max_sessions, per_days) of every rule sessions of ``category`` are held to."""
    name = canonical(category)
    rules = {
        k: (int(r.max_sessions.value), int(r.per_days.value)) for k, r in policy.frequency.items()
    }
    if name in rules:
        return [rules[name]]
    if name in policy.categories_without_rule:
        return []
    return list(rules.values())  # a category the policy does not know: every rule


def same_count(policy: SafetyPolicy, mine: str, theirs: str) -> bool:
    known = set(policy.frequency) | set(policy.categories_without_rule)
    a, b = canonical(mine), canonical(theirs)
    return a == b or (a not in known and b not in known)


def counted(policy: SafetyPolicy, sessions: Sequence[PastSession]) -> int:
    """Sessions as docs/policy.md counts them."""
    whole, short = 0, 0.0
    for session in sessions:
        done = session.completion
        if session.completed or done is None or done >= policy.frequency_count_fraction.value:
            whole += 1
        else:
            short += max(0.0, done)
    return whole + math.floor(short + 1e-9)


@st.composite
def histories(draw: st.DrawFn, category: str, now: datetime) -> list[PastSession]:
    spellings = [category, category.upper(), f" {category} ", "relaxation", "other", "firming"]
    sessions = []
    for _ in range(draw(st.integers(0, 12))):
        completion = draw(st.sampled_from([None, 0.0, 0.2, 0.3, 0.49, 0.49, 0.5, 0.8, 1.0]))
        sessions.append(
            PastSession(
                now - timedelta(hours=draw(st.floats(0, 24 * 21))),
                draw(st.sampled_from(spellings)),
                draw(st.sampled_from(list(DeviceKindName))),
                completed=completion == 1.0,
                completion=completion,
            )
        )
    return sessions


def check_admissions(
    routine: Routine,
    policy: SafetyPolicy,
    history: list[PastSession],
    attempts: Sequence[tuple[float, float | None]],
    now: datetime,
) -> None:
    """Attempts at ``now + hours``, each admitted run done to the given completion: no
    window ever holds more counted sessions than a rule allows, the new one included."""
    sessions = list(history)
    # The policy's rules, whatever the routine's schedule says, and its schedule on top.
    limits = rules_for(policy, routine.category)
    if routine.schedule is not None:
        limits.append((routine.schedule.max_sessions, routine.schedule.per_days))
    for hours, completion in attempts:
        at = now + timedelta(hours=hours)
        admission = check_admission(routine, policy, now=at, history=sessions, treatments=[])
        if not admission.allowed:
            frequency = [r for r in admission.refusals if r.reason == "frequency"]
            if frequency and len(frequency) == len(admission.refusals):
                # The refusal says when: from then on no frequency rule refuses.
                when = max(r.allowed_from for r in frequency if r.allowed_from is not None)
                assert when > at
                later = check_admission(routine, policy, now=when, history=sessions, treatments=[])
                assert not [r for r in later.refusals if r.reason == "frequency"], later
            continue
        new = PastSession(
            at, routine.category, routine.device_kind, completion == 1.0, completion=completion
        )
        for max_sessions, per_days in limits:
            window = [
                s
                for s in [*sessions, new]
                if same_count(policy, routine.category, s.category)
                and at - timedelta(days=per_days) < s.started_at <= at
            ]
            assert counted(policy, window) <= max_sessions, (max_sessions, per_days, window)
        sessions.append(new)


# --------------------------------------------------------------------------- runs


def short_policy() -> SafetyPolicy:
    """The default policy with caps short enough that runs reach them in seconds: passes
    of 4 s (eye area 3 s); 6 s per zone (side) in a session, but 3.5 s on the cheeks and
    nasolabial folds and 2.5 s around the eyes, shorter than a pass there."""
    text = (
        default_policy_text()
        .replace("pass_cap_s = { value = 60,", "pass_cap_s = { value = 4,")
        .replace("pass_cap_s = { value = 45,", "pass_cap_s = { value = 3,")
        .replace("session_cap_s = { value = 300,", "session_cap_s = { value = 6,")
        .replace("session_cap_s = { value = 90,", "session_cap_s = { value = 2.5,")
        .replace("massage_length_cap_s = { value = 1200,", "massage_length_cap_s = { value = 16,")
        .replace("no_contact_pause_s = { value = 3.0,", "no_contact_pause_s = { value = 1.0,")
    )
    for zone in ("cheek", "nasolabial"):
        text = re.sub(
            rf"(\[zones\.{zone}\]\n(?:.*\n)*?session_cap_s = \{{ value = )6,", r"\g<1>3.5,", text
        )
    return parse_policy(text, label="short policy")


@st.composite
def runnable_massage_texts(draw: st.DrawFn, policy: SafetyPolicy) -> tuple[str, list[str]]:
    """Massage routines of short steps on a few repeated zones, mostly within ``policy``,
    with the zones they use."""
    pool = draw(st.lists(st.sampled_from(MASSAGE_ZONES), min_size=1, max_size=3))
    steps = []
    for _ in range(draw(st.integers(1, 5))):
        zone = draw(st.sampled_from(pool))
        limits = policy.zones[policy_zone(zone)]
        low = round(draw(st.floats(limits.band_kpa.min, limits.band_kpa.max / 2)), 2)
        steps.append(
            table(
                "[[steps]]",
                {
                    "zone": zone,
                    "contact_time_s": round(draw(st.floats(1, limits.pass_cap_s.value)), 2),
                    "mode": draw(st.sampled_from(["vibration", "percussion", "pulse"])),
                    "intensity": draw(st.integers(1, int(limits.intensity_cap.value))),
                    "pressure_kpa": {"min": low, "max": limits.band_kpa.max},
                },
            )
        )
    meta = {
        "name": "run",
        "author": "hypothesis",
        "version": "1",
        "device_kind": "massager",
        "category": "general",
    }
    return table("[routine]", meta) + "".join(steps), pool


pressures = st.sampled_from(
    [0.0, 1.0, 3.0, 4.5, 8.0, 14.0, 16.0, 24.0, 26.0, 60.0, 95.0]
) | st.floats(0, 100)


@st.composite
def hand_scripts(
    draw: st.DrawFn, policy: SafetyPolicy, zones: Sequence[str] = (), *, start_s: float = 2.0
) -> HandScript:
    """A hand on arbitrary zones (Zone.NONE too), at arbitrary pressures, with lifts and
    gaps; mostly on ``zones`` (a routine's) in or near their bands, so that runs reach the
    caps."""
    segments = []
    at_s = start_s
    for _ in range(draw(st.integers(1, 12))):
        at_s += draw(st.sampled_from([0.0, 0.0, 0.0, 0.05, 0.4, 1.5, 3.0]))
        duration_s = draw(st.sampled_from([0.05, 0.3, 1.0, 2.5, 4.5, 7.0]) | st.floats(0.02, 8))
        kpa = pressures
        zone = draw(st.sampled_from(list(Zone)))
        if zones and draw(st.integers(0, 3)):
            name = draw(st.sampled_from(list(zones)))
            zone = Zone(ZONE_CODES[name])
            limits = policy.zones[policy_zone(name)]
            cap = limits.cap_kpa.value
            kpa = st.floats(limits.band_kpa.min, limits.band_kpa.max) | st.sampled_from(
                [0.2, cap * 0.99, cap * 1.05]
            )
        segments.append(
            HandSegment(
                at_s,
                duration_s,
                zone,
                draw(kpa),
                draw(st.none() | st.none() | kpa),
                draw(st.sampled_from([True, True, True, False])),
            )
        )
        at_s += duration_s
    return HandScript(segments)


@dataclass(frozen=True)
class RunDecision:
    kind: str
    reason: str
    step: int
    sequence: int | None


@dataclass(frozen=True)
class RunRecord:
    """What a run left: the stored telemetry (contiguous) and decisions, and, when the
    runner of the test can see it, the device's own samples up to after the run
    (``device_*``), which show what the motor did after the last stored sample."""

    status: str
    summary: Mapping[str, Any]
    sample_rate_hz: float
    sequences: npt.NDArray[np.uint64]
    samples: npt.NDArray[np.void]
    decisions: Sequence[RunDecision]
    device_first_sequence: int | None = None
    device_samples: npt.NDArray[np.void] | None = None


# Runs a checked routine on a massager held by the hand (times in seconds since the
# device booted) and gives back what was stored. Through ``serve``, the routine's
# ``source_text`` is what a signed program carries.
RunRoutine = Callable[[Routine, HandScript], Awaitable[RunRecord]]

# STOP_ALL goes out when the batch with the sample above a limit reaches the host: one
# notification interval (0.1 s at the simulator's default) plus the link and the device
# applying it. Allowed: twice that.
STOP_LATENCY_S: Final = 0.2
SAFETY_KINDS: Final = frozenset({"pause", "stop", "stop_step"})


async def check_run(
    run: RunRoutine, routine: Routine, policy: SafetyPolicy, hand: HandScript
) -> RunRecord:
    """Run ``routine`` under ``hand`` through ``run`` and check the record against ``policy``."""
    record = await run(routine, hand)
    assert_run_within_policy(record, routine, policy)
    return record


def assert_run_within_policy(record: RunRecord, routine: Routine, policy: SafetyPolicy) -> None:
    rate = record.sample_rate_hz
    latency = math.ceil(STOP_LATENCY_S * rate)
    sequences = record.sequences.astype(np.int64)
    assert sequences.size, record.status
    assert np.array_equal(sequences, np.arange(sequences[0], sequences[0] + sequences.size))
    first = int(sequences[0])
    samples = record.samples
    steps = [s for s in routine.steps if isinstance(s, MassageStep)]

    # The step each sample counts for (a zone code the engine does not know counts as the
    # step's zone): a step starts with the sample after its next_step or step_start.
    step_at = np.zeros(sequences.size, dtype=np.int64)
    for decision in record.decisions:
        starts = decision.kind == "next_step" or decision.reason == "step_start"
        if starts and decision.sequence is not None:
            step_at[decision.sequence - first + 1 :] = decision.step - 1
    zones = [
        ZONE_NAMES.get(code, steps[index].zone)
        for code, index in zip(samples["zone"].tolist(), step_at.tolist(), strict=True)
    ]
    contact = (samples["flags"] & MASSAGER_FLAG_CONTACT) != 0
    motor = (samples["flags"] & MASSAGER_FLAG_MOTOR_ON) != 0
    pressure = samples["pressure_dapa"].astype(np.float64) * PRESSURE_KPA_PER_UNIT
    caps = np.array([policy.zones[policy_zone(z)].cap_kpa.value for z in zones])
    above = contact & (pressure > caps)

    # 1. Above a zone's cap the motor stops within the stop latency.
    run_start = None
    for i in range(sequences.size):
        if above[i]:
            run_start = i if run_start is None else run_start
            assert not (motor[i] and i - run_start >= latency), (
                f"motor on {(i - run_start) / rate:.2f} s into a run above the cap, at "
                f"sequence {first + i}"
            )
        else:
            run_start = None

    # 2. Contact time per zone per pass and per zone (side) per session. A pass is the
    # contact (below the cap) on one zone until contact on another; what the motor did
    # there is what the skin got. Each safety stop may let the motor run its latency.
    safety = sorted(
        d.sequence - first
        for d in record.decisions
        if d.kind in SAFETY_KINDS and d.sequence is not None
    )
    treated = contact & motor & ~above
    counted_zone = contact & ~above
    pass_zone, pass_start, pass_treated = None, 0, 0

    def close_pass(end: int) -> None:
        if pass_zone is None:
            return
        limits = policy.zones[policy_zone(pass_zone)]
        stops = sum(1 for s in safety if pass_start <= s <= end)
        allowed = round(limits.pass_cap_s.value * rate) + 1 + latency * (1 + stops)
        assert pass_treated <= allowed, (
            f"{pass_treated / rate:.2f} s on {pass_zone} in one pass from sequence "
            f"{first + pass_start}: cap {limits.pass_cap_s.value:g} s"
        )

    for i in range(sequences.size):
        if not counted_zone[i]:
            continue
        if zones[i] != pass_zone:
            close_pass(i - 1)
            pass_zone, pass_start, pass_treated = zones[i], i, 0
        pass_treated += int(treated[i])
    close_pass(sequences.size - 1)

    summary_by_zone = record.summary.get("contact_s_by_zone", {})
    for zone in set(zones):
        limits = policy.zones[policy_zone(zone)]
        planned = sum(max(1, round(s.contact_time_s * rate)) for s in steps if s.zone == zone)
        cap_samples = max(round(limits.session_cap_s.value * rate), planned)
        on_zone = sum(1 for i, z in enumerate(zones) if z == zone and treated[i])
        assert on_zone <= cap_samples + latency * (1 + len(safety)), (
            f"{on_zone / rate:.2f} s on {zone}: cap {limits.session_cap_s.value:g} s"
        )
        # What the engine counted there stops exactly at the cap.
        assert summary_by_zone.get(zone, 0.0) <= cap_samples / rate + 1e-6

    # 3. The motor runs only within the session cap (and the stop latency after it).
    cap_offset = math.ceil(policy.massage_length_cap_s.value * rate) + latency
    late = np.flatnonzero(motor & (sequences - first >= cap_offset))
    assert late.size == 0, f"motor on at sequence {first + int(late[0])}, after the session cap"
    if record.device_samples is not None and record.device_first_sequence is not None:
        device_motor = (record.device_samples["flags"] & MASSAGER_FLAG_MOTOR_ON) != 0
        offsets = np.arange(device_motor.size) + record.device_first_sequence - first
        late = np.flatnonzero(device_motor & (offsets >= cap_offset))
        assert late.size == 0, "the device ran its motor after the session cap"
        # 4. The run leaves the motor off: on from the stop latency after its end, never.
        after = np.flatnonzero(device_motor & (offsets >= sequences.size + latency))
        assert after.size == 0, "the device's motor ran on after the run ended"
