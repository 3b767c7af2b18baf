"""The massager engine: massager samples in, decisions out. Pure and deterministic.

Rules, per sample (:meth:`MassageEngine._sample`, the one definition):
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
Device faults, when asked for (:class:`~devicebridge.core.faults_detect.FaultChecks`), are
checked on every sample before these rules: a stuck pressure sensor pauses the motor, a
motor that stays off while commanded on stops the session.

Quiet samples: from the engine's state, :meth:`MassageEngine._quiet_window` works out which
of the next samples the rules would only count (no threshold, step end, state change on
them); such samples are counted together (:meth:`MassageEngine._count_quiet`) instead of
going through :meth:`MassageEngine._sample`. The window is derived from the same limits as
the rules, and carried over to the next batch when nothing but its run was counted (a steady
pass works it out once, not once per notification). ``quiet_runs=False`` sends every sample
through the rules: the hypothesis tests in ``tests/core/test_engine_vectorised.py`` check that
both decide the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from devicebridge.core.engine.base import Engine
from devicebridge.core.engine.decisions import (
    Decision,
    DecisionKind,
    PressureState,
    completion,
)
from devicebridge.core.engine.readings import (
    MAX_ZONE_CODE,
    MIN_ZONE_CODE,
    ZONE_CODES,
    ZONE_NAMES,
    first_count_above,
    first_count_at_least,
)
from devicebridge.core.faults_detect import (
    ActuatorWatch,
    FaultChecks,
    SensorVerdict,
    StuckSensorDetector,
)
from devicebridge.core.policy import SIDED_ZONES, SafetyPolicy, ZoneLimits, policy_zone
from devicebridge.core.routine import MassageStep, Routine
from protocols.telemetry import (
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)

# An alarm-condition delay in the sense of IEC 60601-1-8: pressure out of the step's band
# (too low / too high, below the zone's cap) is warned about, and counted as an out-of-band
# event, only once the excursion has lasted this long. A reading that hovers at a band edge
# crosses it back and forth with the load cell's noise every few samples; excursions shorter
# than this are that noise, not the hand. Safety limits (the cap, pauses, stops) are NOT
# delayed: they act on the first sample that reaches them.
OUT_OF_BAND_WARNING_DWELL_S: Final = 0.3

_COUNTED_STATES: Final = frozenset(
    {PressureState.TOO_LOW, PressureState.IN_BAND, PressureState.TOO_HIGH}
)


@dataclass
class MassageSummary:
    """What a massage session did. Times are counted in whole samples; the seconds are
    those counts times the sample period."""

    sample_period_s: float
    contact_samples_by_zone: dict[str, int] = field(default_factory=dict)
    contact_samples: int = 0
    in_band_samples: int = 0
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
    def contact_s(self) -> float:
        return self.contact_samples * self.sample_period_s

    @property
    def time_in_band_s(self) -> float:
        return self.in_band_samples * self.sample_period_s

    @property
    def contact_s_by_zone(self) -> dict[str, float]:
        period_s = self.sample_period_s
        return {zone: n * period_s for zone, n in self.contact_samples_by_zone.items()}

    @property
    def completion(self) -> float:
        """The fraction of the planned contact time done (1.0 once every step is done)."""
        return completion(
            self.steps_contact_samples,
            self.planned_contact_samples,
            every_step_done=self.completed and self.steps_done == self.steps_total,
        )

    @property
    def in_band_fraction(self) -> float:
        return self.in_band_samples / self.contact_samples if self.contact_samples else 0.0


QuietPressure = Mapping[PressureState, tuple[int, int]]


def _quiet_pressure(band_min_kpa: float, band_max_kpa: float, cap_kpa: float) -> QuietPressure:
    """The raw pressures (whole counts, inclusive) that keep each counted pressure state as
    it is against the band ``band_min_kpa..band_max_kpa``, below the cap ``cap_kpa``: raw
    pressure r reads r * PRESSURE_KPA_PER_UNIT kPa, compared as :meth:`MassageEngine._sample`
    compares it."""
    at_least_low = first_count_at_least(band_min_kpa, PRESSURE_KPA_PER_UNIT)
    above_high = first_count_above(band_max_kpa, PRESSURE_KPA_PER_UNIT)
    above_cap = first_count_above(cap_kpa, PRESSURE_KPA_PER_UNIT)
    return {
        PressureState.TOO_LOW: (0, min(at_least_low, above_cap) - 1),
        PressureState.IN_BAND: (at_least_low, min(above_high, above_cap) - 1),
        PressureState.TOO_HIGH: (above_high, above_cap - 1),
    }


@dataclass(slots=True)
class _ZoneRules:
    """A zone's policy limits, with its pass and session caps in samples, and the contact
    it has had this session (per side: one per routine zone name); its code on the wire
    and the quiet pressures of a pass on it off the step's zone (against its own band)."""

    limits: ZoneLimits
    pass_cap_samples: int
    session_cap_samples: int
    zone_code: int
    off_step_quiet_pressure: QuietPressure
    session_samples: int = 0

    @property
    def spent(self) -> bool:
        return self.session_samples >= self.session_cap_samples


@dataclass(frozen=True, slots=True)
class _StepRules:
    """What the quiet window needs of a step, worked out once per step."""

    zone_name: str
    zone: _ZoneRules  # the step zone's
    contact_samples: int  # the step's contact time
    # Raw pressures (whole counts, inclusive) that keep each counted pressure state as it is
    # against the step's band, below the zone's cap.
    quiet_pressure: QuietPressure


@dataclass(slots=True)
class _Excursion:
    """The latest out-of-band excursion (see ``MassageEngine._sample``), and the dwell
    (in samples) it must reach before its warning."""

    dwell_samples: int
    state: PressureState = PressureState.IN_BAND  # TOO_LOW or TOO_HIGH once there is one
    end: int | None = None  # the sequence number of its last sample
    samples: int = 0  # how many samples it has lasted


class _QuietWindow(NamedTuple):
    """Which of the next samples the rules would only count.

    From the engine's state before them, a sample is quiet when it has this contact flag,
    a raw skin temperature below ``temperature_below`` and, on the skin, a raw pressure in
    ``pressure_min..pressure_max`` on the zone of the pass (``zone_code``; on the step's
    zone, an unknown zone counts as it: ``unknown_zone_counts``); and not more than
    ``limit`` in a row are: the next would reach a threshold (pass cap, the zone's session
    cap, step end, no-contact pause, session cap, the out-of-band warning's dwell).
    """

    on_skin: bool
    limit: int
    temperature_below: int
    zone_code: int = 0
    pressure_min: int = 0
    pressure_max: int = -1
    unknown_zone_counts: bool = True

    def quiet_count(
        self,
        raw_pressures: list[int],
        centi_cs: list[int],
        zone_codes: list[int],
        flags: list[int],
        start: int,
        end: int,
    ) -> int:
        """How many samples from ``start`` (before ``end``) are quiet; the caller keeps
        ``end`` within the window's ``limit``."""
        below = self.temperature_below
        if not self.on_skin:
            for index in range(start, end):
                if flags[index] & MASSAGER_FLAG_CONTACT or centi_cs[index] >= below:
                    return index - start
            return end - start
        low, high, code = self.pressure_min, self.pressure_max, self.zone_code
        unknown_counts = self.unknown_zone_counts
        for index in range(start, end):
            zone = zone_codes[index]
            if not (
                flags[index] & MASSAGER_FLAG_CONTACT
                and low <= raw_pressures[index] <= high
                and centi_cs[index] < below
                and (
                    zone == code or (unknown_counts and not MIN_ZONE_CODE <= zone <= MAX_ZONE_CODE)
                )
            ):
                return index - start
        return end - start


def _lowered_intensity(level: int) -> int:
    """The motor level after the skin temperature warning: half, at least 1."""
    return max(1, level // 2)


class MassageEngine(Engine[MassageStep]):
    """Enforces a massager routine over a stream of massager samples."""

    def __init__(
        self,
        routine: Routine,
        policy: SafetyPolicy,
        *,
        sample_rate_hz: float,
        fault_checks: FaultChecks | None = None,
        quiet_runs: bool = True,
    ) -> None:
        super().__init__(routine, policy, MassageStep, sample_rate_hz)
        # ``quiet_runs=False`` sends every sample through the rules (see the module's doc).
        self._quiet_runs = quiet_runs
        # Device-fault checks (a stuck sensor, commands not applied): off unless asked,
        # so a replay of synthetic or stored samples is judged on the policy alone.
        self._stuck = (
            StuckSensorDetector(sample_rate_hz, fault_checks.stuck_sensor_s)
            if fault_checks
            else None
        )
        self._actuators = (
            ActuatorWatch(sample_rate_hz, fault_checks.actuator_grace_s) if fault_checks else None
        )
        self.summary = MassageSummary(self.dt_s, steps_total=len(self._steps))
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
        # The quiet window compares raw readings: samples from this sequence distance on
        # are at or past the session cap, and a quiet sample is below these raw temperatures
        # (before and after the temperature warning).
        self._session_cap_offset = first_count_at_least(
            policy.massage_length_cap_s.value, self.dt_s
        )
        stop_centi_c = first_count_at_least(policy.temperature_stop_c.value, TEMPERATURE_C_PER_UNIT)
        warn_centi_c = first_count_at_least(policy.temperature_warn_c.value, TEMPERATURE_C_PER_UNIT)
        self._quiet_below_centi_c = (min(warn_centi_c, stop_centi_c), stop_centi_c)
        # The window of the last quiet run, when nothing but that run was counted since it
        # was worked out: (window, the sequence right after the run, the sequence at which
        # its limit ends). Counting a run advances every counter its limit was taken from
        # by the run's length (see _count_quiet), and changes nothing else it was derived
        # from, so for the next sample, with the same contact flag, _quiet_window would
        # give the same window with its limit shortened by the run: the next batch of a
        # steady pass starts from it instead of working it out again.
        self._carried: tuple[_QuietWindow, int, int] | None = None

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
                ZONE_CODES[zone],
                _quiet_pressure(limits.band_kpa.min, limits.band_kpa.max, limits.cap_kpa.value),
            )
            self._zone_rules_cache[zone] = rules
        return rules

    def _step_rules(self) -> _StepRules:
        rules = self._step_rules_cache.get(self._index)
        if rules is None:
            step = self.current_step
            zone = self._zone_rules(step.zone)
            rules = _StepRules(
                step.zone,
                zone,
                self._contact_samples[self._index],
                _quiet_pressure(
                    step.pressure_min_kpa, step.pressure_max_kpa, zone.limits.cap_kpa.value
                ),
            )
            self._step_rules_cache[self._index] = rules
        return rules

    def start(self) -> list[Decision]:
        return self._emit([self._guidance(0.0, None)])

    def feed(self, samples: npt.NDArray[np.void], first_sequence: int) -> list[Decision]:
        """Process a contiguous batch; returns the decisions it produced, in order."""
        out: list[Decision] = []
        count = int(samples.shape[0])
        if self._finished or count == 0:
            return out
        if self._first_sequence is None:  # what _session_time_s(first_sequence) does
            self._first_sequence = first_sequence
        raws: list[int] = samples["pressure_dapa"].tolist()
        temperatures: list[int] = samples["skin_temperature_centi_c"].tolist()
        zones: list[int] = samples["zone"].tolist()
        flags: list[int] = samples["flags"].tolist()
        actuators = self._actuators
        motor = (
            [value & MASSAGER_FLAG_MOTOR_ON != 0 for value in flags]
            if actuators is not None
            else []
        )
        quiet_runs = self._quiet_runs
        i = 0
        while i < count and not self._finished:
            sequence = first_sequence + i
            contact = flags[i] & MASSAGER_FLAG_CONTACT != 0
            window: _QuietWindow | None = None
            limit_end = 0
            carried, self._carried = self._carried, None
            if carried is not None and carried[1] == sequence and carried[0].on_skin == contact:
                window, _, limit_end = carried
            elif quiet_runs:
                window = self._quiet_window(contact, sequence)
                if window is not None:
                    limit_end = sequence + window.limit
            if window is not None and limit_end > sequence:
                end = min(count, i + limit_end - sequence)
                if actuators is not None and actuators.commanded_from is not None:
                    # The run must not straddle the sample from which the motor counts as
                    # commanded on: before it, the actuator check expects nothing.
                    before = actuators.commanded_from - sequence
                    if before > 0:
                        end = min(end, i + before)
                run = window.quiet_count(raws, temperatures, zones, flags, i, end)
                if run:
                    skip = False
                    decided = len(out)
                    if actuators is not None:
                        run, skip = self._device_faults(
                            sequence, raws[i : i + run], motor[i : i + run], contact, out
                        )
                    quiet = run - 1 if skip else run
                    if quiet:
                        self._count_quiet(contact, quiet)
                    if not skip and len(out) == decided:  # counted, and nothing else
                        self._carried = (window, sequence + run, limit_end)
                    i += run
                    continue
            # One sample through the fault checks and the rules.
            at, i = i, i + 1
            if actuators is not None:
                _, skip = self._device_faults(sequence, raws[at:i], motor[at:i], contact, out)
                if skip:
                    continue
            self._sample(
                self._session_time_s(sequence),
                sequence,
                raws[at] * PRESSURE_KPA_PER_UNIT,
                temperatures[at] * TEMPERATURE_C_PER_UNIT,
                contact,
                zones[at],
                out,
            )
        if out:  # what _emit(out) does; most batches decide nothing
            self.decisions.extend(out)
        return out

    # ------------------------------------------------------------------ quiet samples
    def _quiet_window(self, on_skin: bool, sequence: int) -> _QuietWindow | None:
        """Which samples from ``sequence`` on would be quiet, given their contact flag.

        ``None`` when no such sample can be: the engine's state alone sends it through the
        rules.
        """
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
        pass_zone = self._pass_zone
        on_step = pass_zone == rules.zone_name
        if on_step:
            zone_rules = rules.zone
            quiet_pressure = rules.quiet_pressure
            limit = min(
                limit,
                zone_rules.pass_cap_samples - self._pass_samples,
                rules.contact_samples - 1 - self._step_contact_samples,
                zone_rules.session_cap_samples - zone_rules.session_samples,
            )
        elif pass_zone is not None and self._off_zone_warned:
            # A pass on another zone than the step's, warned about already: its samples
            # count toward that zone's pass and session (against its own band), not toward
            # the step. Only that zone's code is on it: an unknown one counts as the step's.
            zone_rules = self._zone_rules(pass_zone)
            quiet_pressure = zone_rules.off_step_quiet_pressure
            limit = min(
                limit,
                zone_rules.pass_cap_samples - self._pass_samples,
                zone_rules.session_cap_samples - zone_rules.session_samples,
            )
        else:
            return None
        if state is not PressureState.IN_BAND:
            # Out of band: the samples continue the excursion when the one before was its
            # last. With contiguous sequence numbers it always was here (a sample that ends
            # an excursion otherwise leaves the engine paused, stopped or in another state);
            # after a gap the rules start a new one. Until the warning, quiet up to the
            # sample before the one that reaches the dwell, as with the pass cap.
            excursion = self._excursion
            if excursion.end != sequence - 1:
                return None
            if excursion.samples < excursion.dwell_samples:
                limit = min(limit, excursion.dwell_samples - 1 - excursion.samples)
        if limit <= 0:
            return None
        low, high = quiet_pressure[state]
        return _QuietWindow(True, limit, below, zone_rules.zone_code, low, high, on_step)

    def _count_quiet(self, on_skin: bool, run: int) -> None:
        """What :meth:`_sample` does to ``run`` quiet samples, at once.

        Only for a run in the window :meth:`_quiet_window` gave just before: on the skin,
        the run goes on with the pass (on the current step's zone, or on another one).
        """
        if not on_skin:
            self.state = PressureState.NO_CONTACT
            self._no_contact_samples += run
            return
        zone = self._pass_zone
        assert zone is not None
        self._no_contact_samples = 0
        self._zone_rules_cache[zone].session_samples += run
        self._count_contact(zone, run, in_band=self.state is PressureState.IN_BAND)
        self._pass_samples += run
        if zone == self.current_step.zone:
            self._off_zone_warned = False
            self._step_contact_samples += run
            self.summary.steps_contact_samples += run
        if self.state is not PressureState.IN_BAND:
            # Each sample is one more of the excursion (see _quiet_window).
            excursion = self._excursion
            assert excursion.end is not None
            excursion.end += run
            excursion.samples += run

    def _count_contact(self, zone: str, samples: int, *, in_band: bool) -> None:
        """Contact time on ``zone``, and time in band."""
        summary = self.summary
        summary.contact_samples += samples
        by_zone = summary.contact_samples_by_zone
        by_zone[zone] = by_zone.get(zone, 0) + samples
        if in_band:
            summary.in_band_samples += samples

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
        self._count_contact(zone, 1, in_band=new_state is PressureState.IN_BAND)
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

    def _device_faults(
        self,
        sequence: int,
        raw_pressures: list[int],
        motor_on: list[bool],
        contact: bool,
        out: list[Decision],
    ) -> tuple[int, bool]:
        """Stuck sensor and unapplied commands, on samples from ``sequence`` with one
        contact flag over which the rules change nothing (a quiet run, or one sample).

        Takes the samples up to the first on which a check decides; returns how many it
        took and whether the last must not count (the checks paused or stopped on it).
        """
        stuck, actuators = self._stuck, self._actuators
        assert stuck is not None
        assert actuators is not None
        taken, verdict = stuck.feed(
            raw_pressures, motor_on if contact else [False] * len(raw_pressures)
        )
        if verdict is SensorVerdict.RECOVERED:
            self._resume(out, self._session_time_s(sequence), sequence)
            return taken, False
        if verdict is SensorVerdict.STILL_STUCK:
            return taken, True
        ok = taken if verdict is SensorVerdict.OK else taken - 1
        wanted_on = self._pause_reason is None and contact and actuators.commanded(sequence)
        fed, reported = actuators.feed(
            wanted_on, motor_on if ok == len(motor_on) else motor_on[:ok]
        )
        if reported:
            self._stop(
                out,
                self._session_time_s(sequence + fed - 1),
                sequence + fed - 1,
                "command_not_applied",
                "The massager acknowledged its commands but its motor has stayed off for "
                f"{actuators.grace_s:g} s: the device does not do what it is told. "
                "Session stopped; restart the device.",
                None,
            )
            return fed, True
        if verdict is SensorVerdict.STUCK:
            at = sequence + taken - 1
            stuck_kpa = raw_pressures[taken - 1] * PRESSURE_KPA_PER_UNIT
            self._pause(
                out,
                self._session_time_s(at),
                at,
                "sensor_stuck",
                f"The pressure sensor has read {stuck_kpa:.2f} kPa "
                f"without any change for {stuck.stuck_after_s:g} s while the motor runs: it "
                "seems stuck, so pressure cannot be watched. Motor paused; restart the device. "
                "The routine goes on when the sensor reads again.",
                None,
            )
            return taken, True
        return taken, False

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
