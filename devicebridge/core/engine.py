"""The enforcement engine: telemetry samples in, decisions out. Pure and deterministic.

Time is the device's sample clock: a sample's session time is its sequence distance from
the session's first sample divided by the sample rate, so decisions land at the same
virtual times on every run and do not depend on when batches reach the host.

Massage rules, per sample:
- no skin contact: nothing is counted; after ``no_contact_pause_s`` the motor pauses, and it
  resumes on contact;
- pressure above the policy cap of the zone under the head: pause at once (the host stops
  the motor with STOP_ALL); resume when back in band; the third time in a session: stop;
- pressure outside the step's band: a warning (too low / too high) once per excursion that
  lasts ``OUT_OF_BAND_WARNING_DWELL_S``, and the time in band is counted;
- effective contact time counts only with the head on the skin, per zone and per step; the
  step's time done: next zone (guidance); a zone held past its pass cap: pause until moved;
- contact per zone per session (per side on a sided zone) up to the zone's session cap: on a
  zone that has had it, nothing more counts; the motor pauses until the head moves to
  another zone, and a step on that zone cannot be done, so it ends (the next one starts);
- skin temperature at the warn level: lower intensity; at the stop level: the step ends;
- session length over the cap: stop.

LED rules, per sample: the dose per wavelength is integrated from the reported irradiance
(J/cm² = mW/cm² x s / 1000); at the per-session or remaining daily cap the step stops at the
cap; temperature warn lowers the irradiance, the stop level ends the step.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Final, Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from devicebridge.core.faults_detect import (
    ActuatorWatch,
    FaultChecks,
    SensorVerdict,
    StuckSensorDetector,
)
from devicebridge.core.policy import (
    LED_CHANNELS,
    SIDED_ZONES,
    SafetyPolicy,
    ZoneLimits,
    policy_zone,
)
from devicebridge.core.routine import J_PER_MJ, DeviceKindName, LedStep, MassageStep, Routine

# Zone codes of the wire protocol (protocols.constants.Zone), as names used by routines.
ZONE_NAMES: Final[Mapping[int, str]] = {
    1: "forehead",
    2: "eye_area_left",
    3: "eye_area_right",
    4: "cheek_left",
    5: "cheek_right",
    6: "nasolabial_left",
    7: "nasolabial_right",
    8: "jawline_left",
    9: "jawline_right",
    10: "chin",
    11: "neck",
    12: "masseter_left",
    13: "masseter_right",
}
ZONE_CODES: Final[Mapping[str, int]] = {name: code for code, name in ZONE_NAMES.items()}
CONTACT_FLAG: Final = 0x01  # protocols.telemetry.MASSAGER_FLAG_CONTACT
MOTOR_FLAG: Final = 0x02  # protocols.telemetry.MASSAGER_FLAG_MOTOR_ON
KPA_PER_UNIT: Final = 0.01
CELSIUS_PER_UNIT: Final = 0.01
MW_CM2_PER_UNIT: Final = 0.01
LOWERED_IRRADIANCE_FRACTION: Final = 0.5
BULK_MIN_SAMPLES: Final = 256
# From this many samples on, a quiet-run check on lists tries whole-run builtins (count,
# min, max) before the per-sample loop.
_AGGREGATE_MIN_RUN: Final = 4
# An alarm-condition delay in the sense of IEC 60601-1-8: pressure out of the step's band
# (too low / too high, below the zone's cap) is warned about, and counted as an out-of-band
# event, only once the excursion has lasted this long. A reading that hovers at a band edge
# crosses it back and forth with the load cell's noise every few samples; excursions shorter
# than this are that noise, not the hand. Safety limits (the cap, pauses, stops) are NOT
# delayed: they act on the first sample that reaches them.
OUT_OF_BAND_WARNING_DWELL_S: Final = 0.3


class DecisionKind(StrEnum):
    GUIDANCE = "guidance"  # what to do now (start of a step, move to the step's zone)
    WARNING = "warning"  # pressure out of band, temperature warn
    LOWER_INTENSITY = "lower_intensity"
    PAUSE = "pause"  # actuators off until RESUME
    RESUME = "resume"
    NEXT_STEP = "next_step"
    STOP_STEP = "stop_step"  # the step ends early (dose cap, temperature)
    STOP = "stop"  # the session ends now
    COMPLETE = "complete"


class PressureState(IntEnum):
    NO_CONTACT = 0
    TOO_LOW = 1
    IN_BAND = 2
    TOO_HIGH = 3
    ABOVE_CAP = 4


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    at_s: float  # session time, from the device's sample clock
    step: int  # 1-based step number
    reason: str  # short machine-readable code
    message: str  # for the user
    rule: str | None = None  # the policy rule that decided it, with its source
    sequence: int | None = None  # the sample that triggered it
    zone: str | None = None
    intensity: int | None = None  # for LOWER_INTENSITY / RESUME / GUIDANCE on massagers
    irradiance_mw_cm2: Mapping[str, float] | None = None  # for LED steps


@dataclass
class MassageSummary:
    contact_s_by_zone: dict[str, float] = field(default_factory=dict)
    time_in_band_s: float = 0.0
    contact_s: float = 0.0
    out_of_band_events: int = 0
    cap_events: int = 0
    steps_done: int = 0
    steps_total: int = 0
    completed: bool = False
    stopped_reason: str | None = None
    # Contact that counted toward the steps, and what the steps plan, in whole samples.
    steps_contact_samples: int = 0
    planned_contact_samples: int = 0

    @property
    def completion(self) -> float:
        """The fraction of the planned contact time done (1.0 once every step is done)."""
        if self.completed and self.steps_done == self.steps_total:
            return 1.0
        if not self.planned_contact_samples:
            return 0.0
        return min(1.0, self.steps_contact_samples / self.planned_contact_samples)

    @property
    def in_band_fraction(self) -> float:
        return self.time_in_band_s / self.contact_s if self.contact_s else 0.0


StepT = TypeVar("StepT", MassageStep, LedStep)
_COUNTED_STATES: Final = frozenset(
    {PressureState.TOO_LOW, PressureState.IN_BAND, PressureState.TOO_HIGH}
)
_IN_BAND: Final = PressureState.IN_BAND  # a module global: quicker to read than the member
_MIN_ZONE: Final = min(ZONE_NAMES)
_MAX_ZONE: Final = max(ZONE_NAMES)


def _first_count_at_least(threshold: float, unit: float) -> int:
    """The smallest whole count ``n`` with ``n * unit >= threshold``, compared as floats.

    ``n * unit`` never decreases as ``n`` grows (``unit > 0``), so a raw reading ``r``
    gives ``r * unit >= threshold`` exactly when ``r >= n``: the quiet-run checks compare
    raw integer readings with such counts and decide as the float comparisons would.
    """
    n = math.ceil(threshold / unit)
    while (n - 1) * unit >= threshold:
        n -= 1
    while n * unit < threshold:
        n += 1
    return n


def _first_count_above(threshold: float, unit: float) -> int:
    """The smallest whole count ``n`` with ``n * unit > threshold`` (see above)."""
    n = math.floor(threshold / unit)
    while (n - 1) * unit > threshold:
        n -= 1
    while n * unit <= threshold:
        n += 1
    return n


@dataclass(slots=True)
class _ZoneRules:
    """A zone's policy limits, with its pass and session caps in samples, and the contact
    it has had this session (per side: one per routine zone name)."""

    limits: ZoneLimits
    pass_cap_samples: int
    session_cap_samples: int
    session_samples: int = 0

    @property
    def spent(self) -> bool:
        return self.session_samples >= self.session_cap_samples


@dataclass(frozen=True, slots=True)
class _StepRules:
    """What the quiet-run checks need of a step, worked out once per step."""

    zone_name: str
    zone: _ZoneRules  # the step zone's
    zone_code: int
    contact_samples: int  # the step's contact time
    # Raw pressures (whole counts, inclusive) that keep each counted pressure state as it is,
    # below the zone's cap.
    quiet_pressure: Mapping[PressureState, tuple[int, int]]


@dataclass(slots=True)
class _Excursion:
    """The latest out-of-band excursion (see ``MassageEngine._sample``), and the dwell
    (in samples) it must reach before its warning."""

    dwell_samples: int
    state: PressureState = PressureState.IN_BAND  # TOO_LOW or TOO_HIGH once there is one
    end: int | None = None  # the sequence number of its last sample
    samples: int = 0  # how many samples it has lasted


class _QuietWindow(NamedTuple):  # a tuple: made for every run, cheap to make
    """Which of the next samples the per-sample rules would only count.

    From the engine's state before them, a sample is quiet when it has this contact flag,
    a raw skin temperature below ``temperature_below`` and, on the skin, a raw pressure in
    ``pressure_min..pressure_max`` on the step's zone (or an unknown zone, which counts as
    it); and not more than ``limit`` in a row are: the next would reach a threshold (pass
    cap, the zone's session cap, step end, no-contact pause, session cap, the out-of-band
    warning's dwell). The fault checks are on top of this.
    """

    on_skin: bool
    limit: int
    temperature_below: int
    zone_code: int = 0
    pressure_min: int = 0
    pressure_max: int = -1


def _lowered_intensity(level: int) -> int:
    """The motor level after the skin temperature warning: half, at least 1."""
    return max(1, level // 2)


def _leading_true(mask: npt.NDArray[np.bool_], limit: int) -> int:
    """How many leading entries of ``mask`` are true, at most ``limit``."""
    if limit <= 0:
        return 0
    head = mask[:limit]
    if head.all():
        return int(head.shape[0])
    return int(np.argmin(head))


class _Engine(abc.ABC, Generic[StepT]):
    """What both engines share: the step list, the sample clock, and the decision log."""

    def __init__(
        self, routine: Routine, policy: SafetyPolicy, step_type: type[StepT], sample_rate_hz: float
    ) -> None:
        self._steps: list[StepT] = [s for s in routine.steps if isinstance(s, step_type)]
        if not self._steps:
            raise ValueError(f"routine {routine.name!r} has no {step_type.__name__} steps")
        self.routine = routine
        self.policy = policy
        self.dt_s = 1.0 / sample_rate_hz
        self.decisions: list[Decision] = []
        self._index = 0
        self._first_sequence: int | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def first_sequence(self) -> int | None:
        """The sequence number of the session's first sample (None before one was fed)."""
        return self._first_sequence

    @property
    def step_number(self) -> int:
        return self._index + 1

    @property
    def current_step(self) -> StepT:
        return self._steps[min(self._index, len(self._steps) - 1)]

    def _session_time_s(self, sequence: int) -> float:
        """Session time of a sample, from the device's sample clock."""
        if self._first_sequence is None:
            self._first_sequence = sequence
        return (sequence - self._first_sequence) * self.dt_s

    def _emit(self, decisions: list[Decision]) -> list[Decision]:
        self.decisions.extend(decisions)
        return decisions

    @abc.abstractmethod
    def _default_zone(self) -> str:
        """The zone a decision names when the caller gives none."""

    def _decision(
        self,
        kind: DecisionKind,
        at_s: float,
        reason: str,
        message: str,
        rule: str | None,
        sequence: int | None,
        *,
        zone: str | None = None,
        intensity: int | None = None,
        irradiance: Mapping[str, float] | None = None,
    ) -> Decision:
        return Decision(
            kind,
            round(at_s, 6),
            self.step_number,
            reason,
            message,
            rule,
            sequence,
            zone or self._default_zone(),
            intensity,
            irradiance,
        )


def _run_lengths(
    initial: int, reset: npt.NDArray[np.bool_], restart: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    """A run counter over samples: 0 on ``reset``, 1 on ``restart``, else one more.

    ``initial`` is the counter before the first sample.
    """
    count = reset.shape[0]
    index = np.arange(count, dtype=np.int64)
    last = np.maximum.accumulate(np.where(reset | restart, index, -1))
    base = np.where(reset[np.maximum(last, 0)], 0, 1)
    return np.where(last < 0, initial + index + 1, index - last + base)


class _BulkStuckSensorDetector(StuckSensorDetector):
    """The stuck-sensor check, able to take a run of samples at once."""

    def scan(
        self, raw: npt.NDArray[np.integer], motor_on_skin: npt.NDArray[np.bool_]
    ) -> tuple[int, npt.NDArray[np.int64]]:
        """How many leading samples get an OK verdict, and the run counter after each.

        Changes nothing; :meth:`commit` applies a prefix. Must not be called while stuck.
        """
        active = motor_on_skin & (raw != 0)
        same = np.empty(raw.shape[0], dtype=np.bool_)
        same[1:] = active[:-1] & (raw[1:] == raw[:-1])
        same[0] = self._value is not None and int(raw[0]) == self._value
        runs = _run_lengths(self._run, ~active, active & ~same)
        over = runs >= self.threshold_samples
        return (int(np.argmax(over)) if over.any() else int(raw.shape[0])), runs

    def commit(
        self,
        raw: npt.NDArray[np.integer],
        motor_on_skin: npt.NDArray[np.bool_],
        runs: npt.NDArray[np.int64],
        count: int,
    ) -> None:
        """The state after the first ``count`` samples of a :meth:`scan` (all OK)."""
        last = count - 1
        self._run = int(runs[last])
        active = bool(motor_on_skin[last]) and int(raw[last]) != 0
        self._value = int(raw[last]) if active else None


class _BulkActuatorWatch(ActuatorWatch):
    """The actuator check, able to take a run of samples at once."""

    def scan(
        self, wanted_on: bool, motor_on: npt.NDArray[np.bool_]
    ) -> tuple[int, npt.NDArray[np.int64]]:
        """How many leading samples report nothing, and the mismatch counter after each."""
        reset = motor_on | (not wanted_on)
        runs = _run_lengths(self._mismatch, reset, np.zeros_like(reset))
        if not self.reported:
            over = runs >= self.grace_samples
            if over.any():
                return int(np.argmax(over)), runs
        return int(motor_on.shape[0]), runs

    def commit(self, runs: npt.NDArray[np.int64], count: int) -> None:
        self._mismatch = int(runs[count - 1])


class _Batch(abc.ABC):
    """A batch's columns as the quiet-run checks read them: lists or numpy arrays."""

    count: int

    @abc.abstractmethod
    def sample(self, index: int) -> tuple[int, int, int, int]:
        """Raw pressure, raw skin temperature, zone code and flags of one sample."""

    @abc.abstractmethod
    def quiet_count(self, window: _QuietWindow, start: int, end: int) -> int:
        """How many samples from ``start`` (before ``end``) are in ``window``."""

    @abc.abstractmethod
    def faults_quiet(
        self,
        stuck: _BulkStuckSensorDetector,
        actuators: _BulkActuatorWatch,
        on_skin: bool,
        motor_wanted: bool,
        start: int,
        run: int,
    ) -> int:
        """How many of the ``run`` samples from ``start`` (all quiet so far) get no fault
        verdict; the checks take those samples in. ``motor_wanted``: the motor should run
        on all of them (on the skin, not paused, commanded on)."""


class _ListBatch(_Batch):
    """A short batch, in plain Python: cheaper than numpy calls for a few samples."""

    def __init__(self, samples: npt.NDArray[np.void]) -> None:
        self.count = int(samples.shape[0])
        self.raw: list[int] = samples["pressure_dapa"].tolist()
        self.temperature: list[int] = samples["skin_temperature_centi_c"].tolist()
        self.zones: list[int] = samples["zone"].tolist()
        self.flags: list[int] = samples["flags"].tolist()

    def sample(self, index: int) -> tuple[int, int, int, int]:
        return self.raw[index], self.temperature[index], self.zones[index], self.flags[index]

    def quiet_count(self, window: _QuietWindow, start: int, end: int) -> int:
        temperature, flags = self.temperature, self.flags
        below = window.temperature_below
        run = end - start
        if run >= _AGGREGATE_MIN_RUN:
            # Whole-run checks with builtins first: when every sample passes each condition
            # on its own, every sample passes them all, and the loop below would count them
            # all. Otherwise the loop finds the first that does not.
            if start or end != self.count:
                flags, temperature = flags[start:end], temperature[start:end]
            first_flags = flags[0]
            if (
                flags.count(first_flags) == run
                and max(temperature) < below
                and (
                    (first_flags & CONTACT_FLAG == 0)
                    if not window.on_skin
                    else (first_flags & CONTACT_FLAG and self._on_skin_quiet(window, start, end))
                )
            ):
                return run
            temperature, flags = self.temperature, self.flags
        if not window.on_skin:
            for index in range(start, end):
                if flags[index] & CONTACT_FLAG or temperature[index] >= below:
                    return index - start
            return end - start
        raw, zones = self.raw, self.zones
        low, high, code = window.pressure_min, window.pressure_max, window.zone_code
        for index in range(start, end):
            zone = zones[index]
            if not (
                flags[index] & CONTACT_FLAG
                and low <= raw[index] <= high
                and temperature[index] < below
                and (zone == code or not _MIN_ZONE <= zone <= _MAX_ZONE)
            ):
                return index - start
        return end - start

    def _on_skin_quiet(self, window: _QuietWindow, start: int, end: int) -> bool:
        """Whether every sample of ``[start, end)`` has a pressure in the window's range
        on the window's zone (a sufficient condition for the loop's pressure and zone
        checks; the contact flags and temperatures are checked by the caller)."""
        raw, zones = self.raw, self.zones
        if start or end != self.count:
            raw, zones = raw[start:end], zones[start:end]
        return (
            zones.count(window.zone_code) == end - start
            and min(raw) >= window.pressure_min
            and max(raw) <= window.pressure_max
        )

    def faults_quiet(
        self,
        stuck: _BulkStuckSensorDetector,
        actuators: _BulkActuatorWatch,
        on_skin: bool,
        motor_wanted: bool,
        start: int,
        run: int,
    ) -> int:
        end = start + run
        whole = not start and end == self.count
        # The checks only read these lists: no copy for a run over the whole batch.
        raw = self.raw if whole else self.raw[start:end]
        # Off the skin the motor state does not matter to either check.
        if on_skin:
            flags = self.flags if whole else self.flags[start:end]
            first_flags = flags[0]
            motor_on_skin = (
                [first_flags & MOTOR_FLAG != 0] * run  # the same list, when the flags are
                if flags.count(first_flags) == run
                else [value & MOTOR_FLAG != 0 for value in flags]
            )
        else:
            motor_on_skin = [False] * run
        ok = stuck.ok_count(raw, motor_on_skin)
        ok_motor = actuators.ok_count(motor_wanted, motor_on_skin)
        if ok_motor < ok:
            ok = ok_motor
        if ok:
            if ok < run:
                raw, motor_on_skin = raw[:ok], motor_on_skin[:ok]
            stuck.skip(raw, motor_on_skin)
            actuators.skip(motor_wanted, motor_on_skin)
        return ok


class _ArrayBatch(_Batch):
    """A long batch, in numpy."""

    def __init__(self, samples: npt.NDArray[np.void]) -> None:
        self.count = int(samples.shape[0])
        self.raw: npt.NDArray[np.integer] = samples["pressure_dapa"]
        self.temperature: npt.NDArray[np.integer] = samples["skin_temperature_centi_c"]
        self.zones: npt.NDArray[np.integer] = samples["zone"]
        self.flags: npt.NDArray[np.integer] = samples["flags"]

    def sample(self, index: int) -> tuple[int, int, int, int]:
        return (
            int(self.raw[index]),
            int(self.temperature[index]),
            int(self.zones[index]),
            int(self.flags[index]),
        )

    def quiet_count(self, window: _QuietWindow, start: int, end: int) -> int:
        contact = (self.flags[start:end] & CONTACT_FLAG) != 0
        quiet = self.temperature[start:end] < window.temperature_below
        if window.on_skin:
            z = self.zones[start:end]
            p = self.raw[start:end]
            quiet &= contact & ((z == window.zone_code) | (z < _MIN_ZONE) | (z > _MAX_ZONE))
            quiet &= (p >= window.pressure_min) & (p <= window.pressure_max)
        else:
            quiet &= ~contact
        return _leading_true(quiet, end - start)

    def faults_quiet(
        self,
        stuck: _BulkStuckSensorDetector,
        actuators: _BulkActuatorWatch,
        on_skin: bool,
        motor_wanted: bool,
        start: int,
        run: int,
    ) -> int:
        end = start + run
        raw = self.raw[start:end]
        motor = (self.flags[start:end] & MOTOR_FLAG) != 0
        motor_on_skin = motor if on_skin else np.zeros(run, dtype=np.bool_)
        ok_stuck, stuck_runs = stuck.scan(raw, motor_on_skin)
        ok_motor, motor_runs = actuators.scan(motor_wanted, motor)
        ok = min(ok_stuck, ok_motor)
        if ok:
            stuck.commit(raw, motor_on_skin, stuck_runs, ok)
            actuators.commit(motor_runs, ok)
        return ok


class MassageEngine(_Engine[MassageStep]):
    """Enforces a massager routine over a stream of massager samples."""

    def __init__(
        self,
        routine: Routine,
        policy: SafetyPolicy,
        *,
        sample_rate_hz: float,
        fault_checks: FaultChecks | None = None,
        vectorised: bool = True,
    ) -> None:
        super().__init__(routine, policy, MassageStep, sample_rate_hz)
        # ``vectorised=False`` judges every sample one by one: the reference the quiet-run
        # paths are tested against (tests/core/test_engine_vectorised.py).
        self._vectorised = vectorised
        # From this many samples on (replays, backfill), a batch is checked for quiet runs
        # in numpy; shorter ones (live notifications carry 10 to 55) in plain Python, which
        # costs less there: the two cost the same at about 250 samples of a clean stream.
        self.bulk_min_samples = BULK_MIN_SAMPLES
        # Device-fault checks (a stuck sensor, commands not applied): off unless asked,
        # so a replay of synthetic or stored samples is judged on the policy alone.
        self._stuck = (
            _BulkStuckSensorDetector(sample_rate_hz, fault_checks.stuck_sensor_s)
            if fault_checks
            else None
        )
        self._actuators = (
            _BulkActuatorWatch(sample_rate_hz, fault_checks.actuator_grace_s)
            if fault_checks
            else None
        )
        self.summary = MassageSummary(steps_total=len(self._steps))
        self.state = PressureState.NO_CONTACT
        # Thresholds are compared in whole samples: summing 0.01 s a hundred times does not
        # give exactly 1.0 s, and decisions must land on the same sample every run.
        self._rate_hz = sample_rate_hz
        self._step_contact_samples = 0
        self._no_contact_samples = 0
        self._pass_zone: str | None = None
        self._pass_samples = 0
        self._pause_reason: str | None = None
        self._temperature_warned = False
        self._off_zone_warned = False
        # Whenever ``state`` is TOO_LOW or TOO_HIGH, the excursion is in that same state.
        self._excursion = _Excursion(self._samples_for(OUT_OF_BAND_WARNING_DWELL_S))
        # Per-step and per-zone thresholds, worked out once (the policy is frozen).
        self._contact_samples = [self._samples_for(s.contact_time_s) for s in self._steps]
        self.summary.planned_contact_samples = sum(self._contact_samples)
        self._no_contact_pause_samples = self._samples_for(policy.no_contact_pause_s.value)
        self._zone_rules_cache: dict[str, _ZoneRules] = {}
        self._step_rules_cache: dict[int, _StepRules] = {}
        # The quiet-run checks compare raw readings: samples from this sequence distance on
        # are at or past the session cap, and a quiet sample is below these raw temperatures
        # (before and after the temperature warning).
        self._session_cap_offset = _first_count_at_least(
            policy.massage_length_cap_s.value, self.dt_s
        )
        stop_centi_c = _first_count_at_least(policy.temperature_stop_c.value, CELSIUS_PER_UNIT)
        warn_centi_c = _first_count_at_least(policy.temperature_warn_c.value, CELSIUS_PER_UNIT)
        self._quiet_below_centi_c = (min(warn_centi_c, stop_centi_c), stop_centi_c)
        # No more instance attributes than this: from 30 on, CPython 3.11 stops sharing the
        # instance dictionary's keys, and every attribute read on the quiet-run path (the
        # cost of a clean stream) gets slower. Group new ones in an object, as _excursion.

    @property
    def paused(self) -> bool:
        return self._pause_reason is not None

    @property
    def step_remaining_s(self) -> float:
        done_s = self._step_contact_samples * self.dt_s
        return max(0.0, self.current_step.contact_time_s - done_s)

    @property
    def intensity(self) -> int:
        """The motor level the engine wants now: 0 while paused or once finished; the
        step's level, halved (at least 1) after the skin temperature warning."""
        if self._finished or self._pause_reason is not None:
            return 0
        level = self.current_step.intensity
        return _lowered_intensity(level) if self._temperature_warned else level

    def motor_commanded_from(self, sequence: int | None) -> None:
        """The device acknowledged the motor on from about sample ``sequence`` (None: the
        motor is not commanded on). The check that the device does what it is told only
        expects a running motor from there on: a command lost with the link, or still on
        its way, is not the device ignoring it."""
        if self._actuators is not None:
            self._actuators.commanded_from = sequence

    def _samples_for(self, duration_s: float) -> int:
        return max(1, round(duration_s * self._rate_hz))

    def _zone_rules(self, zone: str) -> _ZoneRules:
        rules = self._zone_rules_cache.get(zone)
        if rules is None:
            limits = self.policy.zones[policy_zone(zone)]
            # A checked routine plans at most the session cap on each zone (side), in
            # seconds; rounding each of its steps to whole samples must not cut the last.
            planned = sum(
                samples
                for step, samples in zip(self._steps, self._contact_samples, strict=True)
                if step.zone == zone
            )
            rules = _ZoneRules(
                limits,
                self._samples_for(limits.pass_cap_s.value),
                max(self._samples_for(limits.session_cap_s.value), planned),
            )
            self._zone_rules_cache[zone] = rules
        return rules

    def _step_rules(self) -> _StepRules:
        rules = self._step_rules_cache.get(self._index)
        if rules is None:
            step = self.current_step
            zone = self._zone_rules(step.zone)
            # Raw pressure r reads r * KPA_PER_UNIT kPa; the whole counts at each boundary:
            at_least_low = _first_count_at_least(step.pressure_min_kpa, KPA_PER_UNIT)
            above_high = _first_count_above(step.pressure_max_kpa, KPA_PER_UNIT)
            above_cap = _first_count_above(zone.limits.cap_kpa.value, KPA_PER_UNIT)
            rules = _StepRules(
                step.zone,
                zone,
                ZONE_CODES[step.zone],
                self._contact_samples[self._index],
                {
                    PressureState.TOO_LOW: (0, min(at_least_low, above_cap) - 1),
                    PressureState.IN_BAND: (at_least_low, min(above_high, above_cap) - 1),
                    PressureState.TOO_HIGH: (above_high, above_cap - 1),
                },
            )
            self._step_rules_cache[self._index] = rules
        return rules

    def start(self) -> list[Decision]:
        return self._emit([self._guidance(0.0, None)])

    def feed(self, samples: npt.NDArray[np.void], first_sequence: int) -> list[Decision]:
        """Process a contiguous batch; returns the decisions it produced, in order."""
        out: list[Decision] = []
        if self._finished or samples.shape[0] == 0:
            return out
        if self._vectorised:
            self._feed_runs(samples, first_sequence, out)
        else:
            self._feed_each(samples, first_sequence, out)
        if out:  # what _emit(out) does; most batches decide nothing
            self.decisions.extend(out)
        return out

    def _feed_each(
        self, samples: npt.NDArray[np.void], first_sequence: int, out: list[Decision]
    ) -> None:
        """Every sample through the per-sample rules: the reference."""
        pressure = (samples["pressure_dapa"] * KPA_PER_UNIT).tolist()
        temperature = (samples["skin_temperature_centi_c"] * CELSIUS_PER_UNIT).tolist()
        contact = ((samples["flags"] & CONTACT_FLAG) != 0).tolist()
        zones = samples["zone"].tolist()
        checks = self._stuck is not None
        raw = samples["pressure_dapa"].tolist() if checks else []
        motor = ((samples["flags"] & MOTOR_FLAG) != 0).tolist() if checks else []
        for i in range(len(pressure)):
            sequence = first_sequence + i
            at_s = self._session_time_s(sequence)
            if checks and self._device_fault(at_s, sequence, raw[i], motor[i], contact[i], out):
                if self.finished:
                    break
                continue
            self._sample(at_s, sequence, pressure[i], temperature[i], contact[i], zones[i], out)
            if self.finished:
                break

    # ------------------------------------------------------------------ quiet runs
    def _feed_runs(
        self, samples: npt.NDArray[np.void], first_sequence: int, out: list[Decision]
    ) -> None:
        """The same decisions as :meth:`_feed_each`, with runs of quiet samples at once.

        A sample is quiet when the per-sample rules would only count it: no threshold, step
        end, state change or fault on it (:meth:`_quiet_window`). Runs of quiet samples
        update the counters at once (:meth:`_count_quiet`); every other sample goes through
        :meth:`_sample` exactly as on the reference path. Short batches are read as lists,
        long ones as numpy arrays.
        """
        count = int(samples.shape[0])
        batch: _Batch = (
            _ArrayBatch(samples) if count >= self.bulk_min_samples else _ListBatch(samples)
        )
        if self._first_sequence is None:  # what _session_time_s(first_sequence) does
            self._first_sequence = first_sequence
        stuck, actuators = self._stuck, self._actuators
        i = 0
        while i < count and not self._finished:
            raw, centi_c, zone_code, flags = batch.sample(i)
            contact = flags & CONTACT_FLAG != 0
            window = self._quiet_window(contact, first_sequence + i)
            if window is not None:
                run = batch.quiet_count(window, i, min(count, i + window.limit))
                if run and stuck is not None:
                    assert actuators is not None
                    sequence = first_sequence + i
                    commanded_from = actuators.commanded_from
                    if commanded_from is not None and sequence < commanded_from:
                        # The run must not straddle the sample from which the motor counts
                        # as commanded on: before it, the actuator check expects nothing.
                        run = min(run, commanded_from - sequence)
                    wanted = contact and actuators.commanded(sequence)
                    run = batch.faults_quiet(stuck, actuators, contact, wanted, i, run)
                if run:
                    self._count_quiet(contact, run)
                    i += run
                    continue
            sequence = first_sequence + i
            at_s = self._session_time_s(sequence)
            motor_on = flags & MOTOR_FLAG != 0
            if stuck is not None and self._device_fault(
                at_s, sequence, raw, motor_on, contact, out
            ):
                i += 1
                continue
            self._sample(
                at_s,
                sequence,
                raw * KPA_PER_UNIT,
                centi_c * CELSIUS_PER_UNIT,
                contact,
                zone_code,
                out,
            )
            i += 1

    def _quiet_window(self, on_skin: bool, sequence: int) -> _QuietWindow | None:
        """Which samples from ``sequence`` on would be quiet, given their contact flag.

        ``None`` when no such sample can be: the engine's state alone sends it through the
        per-sample rules.
        """
        stuck = self._stuck
        if stuck is not None and stuck.stuck:
            return None
        reason = self._pause_reason
        assert self._first_sequence is not None
        limit = self._session_cap_offset - (sequence - self._first_sequence)
        below = self._quiet_below_centi_c[1 if self._temperature_warned else 0]
        if not on_skin:
            if reason in ("over_temperature", "sensor_stuck"):
                return None
            if reason is None:
                # The last sample before the no-contact pause.
                limit = min(limit, self._no_contact_pause_samples - 1 - self._no_contact_samples)
            return _QuietWindow(False, limit, below) if limit > 0 else None
        state = self.state
        if reason is not None or state not in _COUNTED_STATES:
            return None
        rules = self._step_rules()
        if self._pass_zone != rules.zone_name:
            return None
        # min() of three, without the call
        to_pass_cap = rules.zone.pass_cap_samples - self._pass_samples
        if to_pass_cap < limit:
            limit = to_pass_cap
        to_step_end = rules.contact_samples - 1 - self._step_contact_samples
        if to_step_end < limit:
            limit = to_step_end
        zone_rules = rules.zone
        to_zone_cap = zone_rules.session_cap_samples - zone_rules.session_samples
        if to_zone_cap < limit:
            limit = to_zone_cap
        if state is not _IN_BAND:
            # Out of band: the samples continue the excursion when the one before was its
            # last. With contiguous sequence numbers it always was here (a sample that ends
            # an excursion otherwise leaves the engine paused, stopped or in another state);
            # after a gap the per-sample rules start a new one. Until the warning, quiet up
            # to the sample before the one that reaches the dwell, as with the pass cap.
            excursion = self._excursion
            if excursion.end != sequence - 1:
                return None
            if excursion.samples < excursion.dwell_samples:
                limit = min(limit, excursion.dwell_samples - 1 - excursion.samples)
        if limit <= 0:
            return None
        low, high = rules.quiet_pressure[state]
        return _QuietWindow(True, limit, below, rules.zone_code, low, high)

    def _count_quiet(self, on_skin: bool, run: int) -> None:
        """What :meth:`_sample` does to ``run`` quiet samples, at once.

        Only for a run in the window :meth:`_quiet_window` gave just before: on the skin,
        the pass is on the current step's zone.
        """
        if not on_skin:
            self.state = PressureState.NO_CONTACT
            self._no_contact_samples += run
            return
        self._no_contact_samples = 0
        self._pass_samples += run
        self._step_contact_samples += run
        self._off_zone_warned = False
        summary = self.summary
        summary.steps_contact_samples += run
        dt_s = self.dt_s
        zone = self._pass_zone  # the current step's zone (see above), without the property
        assert zone is not None
        self._zone_rules_cache[zone].session_samples += run
        contact_s = summary.contact_s
        zone_s = summary.contact_s_by_zone.get(zone, 0.0)
        # One addition per sample, as the per-sample path does: the same float sums.
        if self.state is PressureState.IN_BAND:
            in_band_s = summary.time_in_band_s
            for _ in range(run):
                contact_s += dt_s
                zone_s += dt_s
                in_band_s += dt_s
            summary.time_in_band_s = in_band_s
        else:
            # Out of band: each sample is one more of the excursion (see _quiet_window).
            excursion = self._excursion
            assert excursion.end is not None
            excursion.end += run
            excursion.samples += run
            for _ in range(run):
                contact_s += dt_s
                zone_s += dt_s
        summary.contact_s = contact_s
        summary.contact_s_by_zone[zone] = zone_s

    # ------------------------------------------------------------------ one sample
    def _sample(
        self,
        at_s: float,
        sequence: int,
        pressure_kpa: float,
        temperature_c: float,
        contact: bool,
        zone_code: int,
        out: list[Decision],
    ) -> None:
        policy = self.policy
        step = self.current_step
        cap = policy.massage_length_cap_s
        if at_s >= cap.value:
            self._stop(
                out, at_s, sequence, "session_length", "Session time is up.", policy.cite(cap)
            )
            return
        if (
            temperature_c >= policy.temperature_stop_c.value
            and self._pause_reason != "over_temperature"
        ):
            self._end_step(out, at_s, sequence, temperature_c)
            return
        if temperature_c >= policy.temperature_warn_c.value and not self._temperature_warned:
            self._temperature_warned = True
            lowered = _lowered_intensity(step.intensity)
            out.append(
                self._decision(
                    DecisionKind.LOWER_INTENSITY,
                    at_s,
                    "temperature_warn",
                    f"Skin temperature {temperature_c:.1f} °C: lowering intensity to {lowered}.",
                    policy.cite(policy.temperature_warn_c),
                    sequence,
                    intensity=lowered,
                )
            )
        if self._pause_reason == "over_temperature":
            if temperature_c >= policy.temperature_warn_c.value:
                return  # wait for the skin to cool below the warn level
            self._resume(out, at_s, sequence)
        if not contact:
            self.state = PressureState.NO_CONTACT
            self._no_contact_samples += 1
            if self._no_contact_samples >= self._no_contact_pause_samples and not self.paused:
                self._pause(
                    out,
                    at_s,
                    sequence,
                    "no_contact",
                    "No skin contact: motor paused. Place the head on the skin.",
                    policy.cite(policy.no_contact_pause_s),
                )
            return
        self._no_contact_samples = 0
        zone = ZONE_NAMES.get(zone_code, step.zone)
        zone_rules = self._zone_rules(zone)
        limits = zone_rules.limits
        if pressure_kpa > limits.cap_kpa.value:
            if self.state is not PressureState.ABOVE_CAP:
                self.summary.cap_events += 1
                self.state = PressureState.ABOVE_CAP
                if self.summary.cap_events >= policy.pressure_cap_events_before_stop.value:
                    self._stop(
                        out,
                        at_s,
                        sequence,
                        "pressure_cap_repeated",
                        f"Pressure went above the {zone} cap {self.summary.cap_events} times: "
                        "session stopped.",
                        policy.cite(policy.pressure_cap_events_before_stop),
                    )
                    return
                if self._pause_reason != "pressure_cap":
                    self._pause(
                        out,
                        at_s,
                        sequence,
                        "pressure_cap",
                        f"{pressure_kpa:.1f} kPa is above the {zone} cap of "
                        f"{limits.cap_kpa.value:g} kPa: motor stopped. Press lighter.",
                        policy.cite(limits.cap_kpa),
                        zone,
                    )
            return
        if zone_rules.spent:
            # Nothing more counts on this zone this session.
            if zone == step.zone:
                self._zone_spent_step(out, at_s, sequence, zone_rules)
            elif self._pause_reason != "zone_session":
                self._pause(
                    out,
                    at_s,
                    sequence,
                    "zone_session",
                    f"{limits.session_cap_s.value:g} s on {zone} is the most for one session: "
                    "move on to another zone.",
                    policy.cite(limits.session_cap_s),
                    zone,
                )
            return
        if self._pause_reason in ("no_contact", "pressure_cap", "zone_session"):
            self._resume(out, at_s, sequence)
        if self._pause_reason == "zone_time":
            if zone == self._pass_zone:
                return
            self._resume(out, at_s, sequence)
        # Time on the skin counts from here on.
        if zone != self._pass_zone:
            self._pass_zone, self._pass_samples = zone, 0
        self._pass_samples += 1
        zone_rules.session_samples += 1
        self.summary.contact_s += self.dt_s
        self.summary.contact_s_by_zone[zone] = (
            self.summary.contact_s_by_zone.get(zone, 0.0) + self.dt_s
        )
        low, high = (
            (step.pressure_min_kpa, step.pressure_max_kpa)
            if zone == step.zone
            else (limits.band_kpa.min, limits.band_kpa.max)
        )
        new_state = (
            PressureState.TOO_LOW
            if pressure_kpa < low
            else PressureState.TOO_HIGH
            if pressure_kpa > high
            else PressureState.IN_BAND
        )
        # An excursion is a run of samples with consecutive sequence numbers on each of
        # which this line is reached with the same out-of-band state. Any other sample ends
        # it: back in band, the other out-of-band state, and every sample that returns
        # before this line (session cap, temperature stop or cooling, no contact, above the
        # cap, still on a zone paused for its pass cap) or that a device fault keeps from
        # the rules (stuck sensor, commands not applied); so does a gap in the sequence
        # numbers. A step end does not: the sample that ends a step is part of the excursion
        # and the pressure state carries over to the next step, as it did when warnings came
        # on entry. The warning, and the out-of-band event, come once per excursion: on the
        # sample where it reaches the dwell (OUT_OF_BAND_WARNING_DWELL_S). The state itself,
        # and the time in band, change at once.
        if new_state is not PressureState.IN_BAND:
            excursion = self._excursion
            if new_state is excursion.state and excursion.end == sequence - 1:
                excursion.samples += 1
            else:
                excursion.state, excursion.samples = new_state, 1
            excursion.end = sequence
            if excursion.samples == excursion.dwell_samples:
                self.summary.out_of_band_events += 1
                high_side = new_state is PressureState.TOO_HIGH
                advice = "press lighter" if high_side else "press a little firmer"
                message = f"{pressure_kpa:.1f} kPa on {zone}, target {low:g}-{high:g} kPa"
                out.append(
                    self._decision(
                        DecisionKind.WARNING,
                        at_s,
                        "pressure_" + new_state.name.lower(),
                        f"{message}: {advice}.",
                        None,
                        sequence,
                        zone=zone,
                    )
                )
        self.state = new_state
        if new_state is PressureState.IN_BAND:
            self.summary.time_in_band_s += self.dt_s
        if zone != step.zone and not self._off_zone_warned:
            self._off_zone_warned = True
            out.append(
                self._decision(
                    DecisionKind.GUIDANCE,
                    at_s,
                    "wrong_zone",
                    f"This step is for {step.zone}, the head is on {zone}.",
                    None,
                    sequence,
                    zone=step.zone,
                )
            )
        if self._pass_samples > zone_rules.pass_cap_samples:
            self._pause(
                out,
                at_s,
                sequence,
                "zone_time",
                f"{limits.pass_cap_s.value:g} s on {zone} is the most for one pass: move on.",
                policy.cite(limits.pass_cap_s),
                zone,
            )
            return
        if zone != step.zone:
            return
        self._off_zone_warned = False
        self._step_contact_samples += 1
        self.summary.steps_contact_samples += 1
        if self._step_contact_samples >= self._contact_samples[self._index]:
            self._advance(out, at_s, sequence)

    def _device_fault(
        self,
        at_s: float,
        sequence: int,
        raw_pressure: int,
        motor_on: bool,
        contact: bool,
        out: list[Decision],
    ) -> bool:
        """Stuck sensor and unapplied commands; ``True`` when the sample must not count."""
        assert self._stuck is not None
        assert self._actuators is not None
        verdict = self._stuck.update(raw_pressure, motor_on and contact)
        if verdict is SensorVerdict.STUCK:
            self._pause(
                out,
                at_s,
                sequence,
                "sensor_stuck",
                f"The pressure sensor has read {raw_pressure * KPA_PER_UNIT:.2f} kPa without "
                f"any change for {self._stuck.stuck_after_s:g} s while the motor runs: it seems "
                "stuck, so pressure cannot be watched. Motor paused; restart the device. The "
                "routine goes on when the sensor reads again.",
                None,
            )
            return True
        if self._pause_reason == "sensor_stuck":
            if verdict is SensorVerdict.RECOVERED:
                self._resume(out, at_s, sequence)
                return False
            return True
        wanted_on = not self.paused and contact and self._actuators.commanded(sequence)
        if self._actuators.update(wanted_on, motor_on):
            self._stop(
                out,
                at_s,
                sequence,
                "command_not_applied",
                "The massager acknowledged its commands but its motor has stayed off for "
                f"{self._actuators.grace_s:g} s: the device does not do what it is told. "
                "Session stopped; restart the device.",
                None,
            )
            return True
        return False

    # ------------------------------------------------------------------ transitions
    def _default_zone(self) -> str:
        return self.current_step.zone

    def _guidance(self, at_s: float, sequence: int | None) -> Decision:
        step = self.current_step
        text = (
            f"Step {self.step_number}/{len(self._steps)}: {step.zone}, {step.contact_time_s:g} s, "
            f"{step.pressure_min_kpa:g}-{step.pressure_max_kpa:g} kPa. {step.guidance}".strip()
        )
        return self._decision(
            DecisionKind.GUIDANCE,
            at_s,
            "step_start",
            text,
            None,
            sequence,
            intensity=step.intensity,
        )

    def _pause(
        self,
        out: list[Decision],
        at_s: float,
        sequence: int,
        reason: str,
        message: str,
        rule: str | None,
        zone: str | None = None,
    ) -> None:
        self._pause_reason = reason
        out.append(
            self._decision(DecisionKind.PAUSE, at_s, reason, message, rule, sequence, zone=zone)
        )

    def _resume(self, out: list[Decision], at_s: float, sequence: int) -> None:
        reason = self._pause_reason or ""
        self._pause_reason = None
        out.append(
            self._decision(
                DecisionKind.RESUME,
                at_s,
                reason,
                "Resuming.",
                None,
                sequence,
                intensity=self.current_step.intensity,
            )
        )

    def _advance(self, out: list[Decision], at_s: float, sequence: int) -> None:
        self.summary.steps_done += 1
        self._index += 1
        self._step_contact_samples = 0
        self._temperature_warned = False
        if self._index >= len(self._steps):
            self._index = len(self._steps) - 1
            self._finished = True
            self.summary.completed = True
            out.append(
                self._decision(
                    DecisionKind.COMPLETE, at_s, "complete", "Routine complete.", None, sequence
                )
            )
            return
        nxt = self._guidance(at_s, sequence)
        out.append(
            Decision(
                DecisionKind.NEXT_STEP,
                nxt.at_s,
                nxt.step,
                "step_done",
                nxt.message,
                None,
                sequence,
                nxt.zone,
                nxt.intensity,
            )
        )

    def _end_step(
        self, out: list[Decision], at_s: float, sequence: int, temperature_c: float
    ) -> None:
        policy = self.policy
        # Actuators stay off until the skin cools below the warn level.
        self._stop_step(
            out,
            at_s,
            sequence,
            "over_temperature",
            f"Skin temperature {temperature_c:.1f} °C reached the stop level: step ended.",
            policy.cite(policy.temperature_stop_c),
        )

    def _zone_spent_step(
        self, out: list[Decision], at_s: float, sequence: int, zone: _ZoneRules
    ) -> None:
        """The step's zone has had its session cap: the step cannot be done. Actuators
        stay off until the head is on a zone that may still have contact."""
        step = self.current_step
        cap = zone.limits.session_cap_s
        each = " per side" if step.policy_zone in SIDED_ZONES else ""
        self._stop_step(
            out,
            at_s,
            sequence,
            "zone_session",
            f"{step.zone} has had the most contact for one session ({cap.value:g} s{each}): "
            "step ended, move on.",
            self.policy.cite(cap),
        )

    def _stop_step(
        self,
        out: list[Decision],
        at_s: float,
        sequence: int,
        reason: str,
        message: str,
        rule: str,
    ) -> None:
        """The step ends early; the next starts paused for ``reason`` (or the session ends)."""
        out.append(self._decision(DecisionKind.STOP_STEP, at_s, reason, message, rule, sequence))
        self._index += 1
        self._step_contact_samples = 0
        self._temperature_warned = False
        if self._index >= len(self._steps):
            self._index = len(self._steps) - 1
            self._finish(reason)
            return
        self._pause_reason = reason
        out.append(self._guidance(at_s, sequence))

    def _stop(
        self,
        out: list[Decision],
        at_s: float,
        sequence: int,
        reason: str,
        message: str,
        rule: str | None,
    ) -> None:
        out.append(self._decision(DecisionKind.STOP, at_s, reason, message, rule, sequence))
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        self._finished = True
        self.summary.stopped_reason = reason


@dataclass
class LedSummary:
    dose_j_cm2: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LED_CHANNELS, 0.0))
    light_s: float = 0.0
    max_temperature_c: float = float("-inf")
    steps_done: int = 0
    steps_total: int = 0
    completed: bool = False
    stopped_reason: str | None = None
    planned_light_s: float = 0.0

    @property
    def completion(self) -> float:
        """The fraction of the planned light time done (1.0 once every step is done)."""
        if self.completed and self.steps_done == self.steps_total:
            return 1.0
        if not self.planned_light_s:
            return 0.0
        return min(1.0, self.light_s / self.planned_light_s)


class LedEngine(_Engine[LedStep]):
    """Enforces an LED mask routine: dose per wavelength, temperature, step timing."""

    def __init__(
        self,
        routine: Routine,
        policy: SafetyPolicy,
        *,
        sample_rate_hz: float,
        dose_today_j_cm2: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(routine, policy, LedStep, sample_rate_hz)
        self.summary = LedSummary(
            steps_total=len(self._steps), planned_light_s=sum(s.duration_s for s in self._steps)
        )
        today = dict(dose_today_j_cm2 or {})
        # The dose this session may still deliver per channel: the smaller of the per-session
        # cap and what is left of the daily cap.
        self.dose_allowed_j_cm2 = {
            ch: max(
                0.0,
                min(
                    policy.led[ch].dose_cap_session_j_cm2.value,
                    policy.led[ch].dose_cap_day_j_cm2.value - today.get(ch, 0.0),
                ),
            )
            for ch in LED_CHANNELS
        }
        self._step_started_s = 0.0
        self._elapsed_s = 0.0  # session time after the last sample fed
        self._temperature_warned = False
        self._scale = 1.0

    @property
    def step_remaining_s(self) -> float:
        """Light time left in the current step, by the device's sample clock."""
        if self._finished:
            return 0.0
        done_s = max(0.0, self._elapsed_s - self._step_started_s)
        return max(0.0, self.current_step.duration_s - done_s)

    @property
    def elapsed_s(self) -> float:
        """Session time after the last sample fed (0 before the first)."""
        return self._elapsed_s

    def setpoints_mw_cm2(self) -> dict[str, float]:
        """Irradiance to command for the current step (after any lowering)."""
        return {ch: self.current_step.irradiance_mw_cm2(ch) * self._scale for ch in LED_CHANNELS}

    def start(self) -> list[Decision]:
        return self._emit([self._guidance(0.0, None)])

    def feed(self, samples: npt.NDArray[np.void], first_sequence: int) -> list[Decision]:
        out: list[Decision] = []
        if self._finished or samples.shape[0] == 0:
            return out
        irradiance = {
            ch: (samples[f"{ch}_centi_mw_cm2"] * MW_CM2_PER_UNIT).tolist() for ch in LED_CHANNELS
        }
        temperature = (samples["skin_temperature_centi_c"] * CELSIUS_PER_UNIT).tolist()
        policy = self.policy
        for i in range(samples.shape[0]):
            sequence = first_sequence + i
            at_s = self._session_time_s(sequence)
            self.summary.max_temperature_c = max(self.summary.max_temperature_c, temperature[i])
            lit = False
            for ch in LED_CHANNELS:
                level = irradiance[ch][i]
                if level > 0:
                    lit = True
                    self.summary.dose_j_cm2[ch] += level * self.dt_s / J_PER_MJ
            if lit:
                self.summary.light_s += self.dt_s
            capped = [
                ch
                for ch in LED_CHANNELS
                if self.summary.dose_j_cm2[ch] >= self.dose_allowed_j_cm2[ch] - 1e-12
                and irradiance[ch][i] > 0
            ]
            if capped:
                ch = capped[0]
                limit = policy.led[ch]
                out.append(
                    self._decision(
                        DecisionKind.STOP_STEP,
                        at_s,
                        "dose_cap",
                        f"{ch.replace('_', '-')} dose reached "
                        f"{self.summary.dose_j_cm2[ch]:.2f} J/cm², the most allowed now "
                        f"({self.dose_allowed_j_cm2[ch]:.2f} J/cm²): light off.",
                        policy.cite(limit.dose_cap_session_j_cm2),
                        sequence,
                    )
                )
                self._next(out, at_s, sequence, ended_early=True, reason="dose_cap")
            elif temperature[i] >= policy.temperature_stop_c.value:
                out.append(
                    self._decision(
                        DecisionKind.STOP_STEP,
                        at_s,
                        "over_temperature",
                        f"Skin temperature {temperature[i]:.1f} °C reached the stop level: "
                        "step ended.",
                        policy.cite(policy.temperature_stop_c),
                        sequence,
                    )
                )
                self._next(out, at_s, sequence, ended_early=True, reason="over_temperature")
            elif temperature[i] >= policy.temperature_warn_c.value and not self._temperature_warned:
                self._temperature_warned = True
                self._scale = LOWERED_IRRADIANCE_FRACTION
                out.append(
                    self._decision(
                        DecisionKind.LOWER_INTENSITY,
                        at_s,
                        "temperature_warn",
                        f"Skin temperature {temperature[i]:.1f} °C: irradiance halved.",
                        policy.cite(policy.temperature_warn_c),
                        sequence,
                        irradiance=self.setpoints_mw_cm2(),
                    )
                )
            elif at_s - self._step_started_s + self.dt_s >= self.current_step.duration_s - 1e-9:
                self._next(out, at_s, sequence, ended_early=False, reason="step_done")
            if self.finished:
                break
        self._elapsed_s = at_s + self.dt_s
        return self._emit(out)

    def _default_zone(self) -> str:
        return "face"  # a mask covers the whole face

    def _guidance(self, at_s: float, sequence: int | None) -> Decision:
        step = self.current_step
        levels = ", ".join(
            f"{ch.replace('_', '-')} {step.irradiance_mw_cm2(ch):g}"
            for ch in LED_CHANNELS
            if step.irradiance_mw_cm2(ch) > 0
        )
        text = (
            f"Step {self.step_number}/{len(self._steps)}: {levels} mW/cm² for "
            f"{step.duration_s:g} s. {step.guidance}".strip()
        )
        return self._decision(
            DecisionKind.GUIDANCE,
            at_s,
            "step_start",
            text,
            None,
            sequence,
            irradiance=self.setpoints_mw_cm2(),
        )

    def _next(
        self, out: list[Decision], at_s: float, sequence: int, *, ended_early: bool, reason: str
    ) -> None:
        if not ended_early:
            self.summary.steps_done += 1
        self._index += 1
        self._step_started_s = at_s + self.dt_s
        self._temperature_warned = False
        self._scale = 1.0
        if self._index >= len(self._steps):
            self._index = len(self._steps) - 1
            self._finished = True
            self.summary.completed = not ended_early
            self.summary.stopped_reason = reason if ended_early else None
            out.append(
                self._decision(
                    DecisionKind.COMPLETE if not ended_early else DecisionKind.STOP,
                    at_s,
                    reason,
                    "Routine complete." if not ended_early else "Routine ended early.",
                    None,
                    sequence,
                )
            )
            return
        nxt = self._guidance(at_s, sequence)
        out.append(
            Decision(
                DecisionKind.NEXT_STEP,
                nxt.at_s,
                nxt.step,
                reason,
                nxt.message,
                None,
                sequence,
                nxt.zone,
                None,
                nxt.irradiance_mw_cm2,
            )
        )


def new_engine(
    routine: Routine,
    policy: SafetyPolicy,
    *,
    sample_rate_hz: float,
    dose_today_j_cm2: Mapping[str, float] | None = None,
    fault_checks: FaultChecks | None = None,
) -> MassageEngine | LedEngine:
    """The engine of ``routine``'s kind of device."""
    if routine.device_kind is DeviceKindName.MASSAGER:
        return MassageEngine(
            routine, policy, sample_rate_hz=sample_rate_hz, fault_checks=fault_checks
        )
    return LedEngine(
        routine, policy, sample_rate_hz=sample_rate_hz, dose_today_j_cm2=dose_today_j_cm2
    )
