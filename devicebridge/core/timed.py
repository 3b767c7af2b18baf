"""Guidance by time: the engine of a massage routine on a device that measures no pressure
and no skin contact (a FOREO LUNA, say). Pure and deterministic.

Time is the host clock's, as the runner hands it in (:meth:`TimedMassageEngine.tick`, in
seconds since the session started): nothing on the device can say how long the head was on
the skin, so every second counts, whatever the user does. That is the strict reading of
every time cap:

- each step lasts its ``duration_s`` on its zone, never longer than the zone's pass cap,
  nor than what is left of the zone's session cap (per side): a step a cap cuts short ends
  there (``STOP_STEP``, citing the rule) and the next begins;
- the session ends at the policy's session cap (``STOP``);
- the motor runs at the step's intensity, never above the zone's ``intensity_cap``
  (``LOWER_INTENSITY`` says so when a step asks for more);
- guidance: the zone and its time at every zone change (``GUIDANCE`` at the start,
  ``NEXT_STEP`` after), and a cue to move to the next spot every ``move_cue_interval_s``
  within a zone (``GUIDANCE``, reason ``move_cue``), as handheld devices' manuals do,
  except one that would fall within ``MIN_CUE_LEAD_S`` of the zone change;
- a lost link ends the session (:meth:`link_lost`): with no measurement, nothing can say
  what the device did meanwhile; so does a device that refuses or does not answer a
  command (:meth:`device_fault`): what its motor does is no longer known.

Decisions are :class:`~devicebridge.core.engine.Decision` values like the other engines',
timed at the exact moment they fall due, whenever the tick that finds them arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from devicebridge.core.engine import Decision, DecisionKind
from devicebridge.core.engine.base import StepCursor
from devicebridge.core.engine.decisions import completion
from devicebridge.core.policy import SIDED_ZONES, Limit, SafetyPolicy
from devicebridge.core.routine import MassageStep, Routine

MOVE_CUE: Final = "move_cue"
DEVICE_FAULT: Final = "device_fault"
# A cue to move to the next spot with less than this left on the zone is noise: the zone
# change, itself a cue, follows at once.
MIN_CUE_LEAD_S: Final = 5.0
LINK_LOST: Final = "link_lost"
# Two deadlines this close are one moment (float sums of step times).
_SAME_MOMENT_S: Final = 1e-9


@dataclass
class TimedSummary:
    """What a session by time did: time per zone by the clock, steps and cues."""

    time_s_by_zone: dict[str, float] = field(default_factory=dict)
    time_s: float = 0.0  # the steps' time, by the clock
    planned_s: float = 0.0
    cues: int = 0
    steps_done: int = 0
    steps_total: int = 0
    completed: bool = False
    stopped_reason: str | None = None

    @property
    def completion(self) -> float:
        """The fraction of the planned time done (1.0 once every step is done)."""
        return completion(
            self.time_s,
            self.planned_s,
            every_step_done=self.completed and self.steps_done == self.steps_total,
        )


class TimedMassageEngine(StepCursor[MassageStep]):
    """Runs a massage routine by the host clock (see the module doc).

    ``start`` once, then ``tick(now_s)`` whenever time has passed; :attr:`next_due_s` says
    when the next decision falls due, so a caller can sleep exactly until then.
    """

    def __init__(self, routine: Routine, policy: SafetyPolicy) -> None:
        super().__init__(routine, policy, MassageStep)
        self.summary = TimedSummary(
            steps_total=len(self._steps), planned_s=sum(s.contact_time_s for s in self._steps)
        )
        self.cue_interval_s = policy.move_cue_interval_s.value
        self._now_s = 0.0
        self._step_start_s = 0.0
        self._next_cue_s = 0.0
        self._zone_used_s: dict[str, float] = {}
        self._started = False

    # ------------------------------------------------------------------ state

    @property
    def elapsed_s(self) -> float:
        """Session time of the latest tick."""
        return self._now_s

    @property
    def step_remaining_s(self) -> float:
        if self._finished:
            return 0.0
        return max(0.0, self._step_end_s() - self._now_s)

    @property
    def session_remaining_s(self) -> float:
        """This step's time left and the planned time of the steps after it."""
        if self._finished:
            return 0.0
        later = sum(s.contact_time_s for s in self._steps[self._index + 1 :])
        return self.step_remaining_s + later

    @property
    def intensity(self) -> int:
        """The motor level wanted now (routine scale 1-10; 0 once finished)."""
        if self._finished or not self._started:
            return 0
        step = self.current_step
        return min(step.intensity, int(self._zone_limits(step).intensity_cap.value))

    @property
    def next_due_s(self) -> float | None:
        """When the next decision falls due (session time), None once finished."""
        if self._finished or not self._started:
            return None
        return min(self._next_cue_s, self._step_end_s(), self._session_end_s())

    # ------------------------------------------------------------------ input

    def start(self, at_s: float = 0.0) -> list[Decision]:
        """The session starts: the first step's guidance."""
        if self._started:
            return []
        self._started = True
        self._now_s = at_s
        out: list[Decision] = []
        self._begin_step(out, at_s, DecisionKind.GUIDANCE, "step_start")
        return self._emit(out)

    def tick(self, now_s: float) -> list[Decision]:
        """Time is now ``now_s`` (session seconds): every decision due by then, in order."""
        out: list[Decision] = []
        if not self._started or self._finished:
            return out
        self._now_s = max(self._now_s, now_s)
        while not self._finished:
            step_end = self._step_end_s()
            session_end = self._session_end_s()
            due = min(self._next_cue_s, step_end, session_end)
            if due > self._now_s + _SAME_MOMENT_S:
                break
            # At one moment: the step's end first (a routine that fits the session cap
            # completes), then the session cap, then a cue (a zone change is the cue).
            if step_end <= min(self._next_cue_s, session_end) + _SAME_MOMENT_S:
                self._end_step(out, step_end)
            elif session_end <= self._next_cue_s + _SAME_MOMENT_S:
                self._account_step(session_end)
                cap = self.policy.massage_length_cap_s
                self._stop(
                    out,
                    session_end,
                    "session_cap",
                    f"The session reached its cap of {cap.value:g} s: stop now.",
                    self.policy.cite(cap),
                )
            else:
                self._cue(out, self._next_cue_s)
        return self._emit(out)

    def link_lost(self, at_s: float) -> list[Decision]:
        """The link dropped: the session ends (nothing measured what the device did)."""
        if not self._started or self._finished:
            return []
        self._now_s = max(self._now_s, at_s)
        self._account_step(self._now_s)
        out: list[Decision] = []
        self._stop(
            out,
            self._now_s,
            LINK_LOST,
            "The link to the device was lost: this device reports nothing, so nothing can "
            "say what it did meanwhile. The session ends; the device is stopped when it is "
            "back.",
            None,
        )
        return self._emit(out)

    def device_fault(self, at_s: float, what: str) -> list[Decision]:
        """The device refused or did not answer a command (``what`` says which): the
        session stops, since nothing else can tell what its motor does."""
        if not self._started or self._finished:
            return []
        self._now_s = max(self._now_s, at_s)
        self._account_step(self._now_s)
        out: list[Decision] = []
        self._stop(
            out,
            self._now_s,
            DEVICE_FAULT,
            f"The device did not do what it was told ({what}); this device reports nothing, "
            "so the session stops.",
            None,
        )
        return self._emit(out)

    def interrupt(self, at_s: float) -> None:
        """The run ends at ``at_s`` for a reason of its own (a stop asked for, Ctrl-C): the
        time of the step in progress is counted, no decision is made."""
        if not self._started or self._finished:
            return
        self._now_s = max(self._now_s, at_s)
        self._account_step(self._now_s)
        self._finished = True

    # ------------------------------------------------------------------ internals

    def _emit(self, decisions: list[Decision]) -> list[Decision]:
        self.decisions.extend(decisions)
        return decisions

    def _zone_limits(self, step: MassageStep) -> _Limits:
        zone = self.policy.zones[step.policy_zone]
        return _Limits(zone.pass_cap_s, zone.session_cap_s, zone.intensity_cap)

    def _session_end_s(self) -> float:
        return self.policy.massage_length_cap_s.value

    def _step_cap(self) -> tuple[float, Limit | None]:
        """How long the current step may last, and the cap that cuts it (None: its time)."""
        step = self.current_step
        limits = self._zone_limits(step)
        left_on_zone = limits.session_cap_s.value - self._zone_used_s.get(step.zone, 0.0)
        length, cap = step.contact_time_s, None
        if limits.pass_cap_s.value < length:
            length, cap = limits.pass_cap_s.value, limits.pass_cap_s
        if left_on_zone < length:
            length, cap = max(0.0, left_on_zone), limits.session_cap_s
        return length, cap

    def _step_end_s(self) -> float:
        return self._step_start_s + self._step_cap()[0]

    def _account_step(self, end_s: float) -> None:
        """The current step's time up to ``end_s`` goes to its zone and the session."""
        spent = max(0.0, end_s - self._step_start_s)
        self._step_start_s = end_s
        if spent <= 0:
            return
        zone = self.current_step.zone
        self._zone_used_s[zone] = self._zone_used_s.get(zone, 0.0) + spent
        by_zone = self.summary.time_s_by_zone
        by_zone[zone] = round(by_zone.get(zone, 0.0) + spent, 9)
        self.summary.time_s += spent

    def _decision(
        self,
        kind: DecisionKind,
        at_s: float,
        reason: str,
        message: str,
        rule: str | None = None,
        intensity: int | None = None,
    ) -> Decision:
        return Decision(
            kind,
            round(at_s, 6),
            self.step_number,
            reason,
            message,
            rule,
            None,
            self.current_step.zone,
            intensity,
        )

    def _begin_step(
        self, out: list[Decision], at_s: float, kind: DecisionKind, reason: str
    ) -> None:
        step = self.current_step
        self._step_start_s = at_s
        self._next_cue_s = at_s + self.cue_interval_s
        length, _ = self._step_cap()
        level = self.intensity
        text = (
            f"Step {self.step_number}/{len(self._steps)}: {step.zone} for {length:g} s "
            f"(by the clock), intensity {level}. Move to the next spot every "
            f"{self.cue_interval_s:g} s. {step.guidance}"
        ).strip()
        out.append(self._decision(kind, at_s, reason, text, intensity=level))
        if level < step.intensity:
            cap = self._zone_limits(step).intensity_cap
            out.append(
                self._decision(
                    DecisionKind.LOWER_INTENSITY,
                    at_s,
                    "zone_intensity_cap",
                    f"Intensity {step.intensity} is above the {step.policy_zone} cap: "
                    f"running at {level}.",
                    self.policy.cite(cap),
                    level,
                )
            )

    def _cue(self, out: list[Decision], at_s: float) -> None:
        left_s = max(0.0, self._step_end_s() - at_s)
        self._next_cue_s = at_s + self.cue_interval_s
        if left_s < MIN_CUE_LEAD_S:
            return
        self.summary.cues += 1
        out.append(
            self._decision(
                DecisionKind.GUIDANCE,
                at_s,
                MOVE_CUE,
                f"Move to the next spot on {self.current_step.zone} ({left_s:g} s left here).",
            )
        )

    def _end_step(self, out: list[Decision], at_s: float) -> None:
        step = self.current_step
        _, cap = self._step_cap()
        self._account_step(at_s)
        if cap is not None:
            each = " per side" if step.policy_zone in SIDED_ZONES else ""
            what = "per pass" if cap is self._zone_limits(step).pass_cap_s else "per session"
            out.append(
                self._decision(
                    DecisionKind.STOP_STEP,
                    at_s,
                    "zone_time_cap",
                    f"{step.zone} has had its {cap.value:g} s {what}{each}: step ended, move on.",
                    self.policy.cite(cap),
                )
            )
        else:
            self.summary.steps_done += 1
        self._index += 1
        if self._index >= len(self._steps):
            self._index = len(self._steps) - 1
            self._finished = True
            self.summary.completed = self.summary.steps_done == len(self._steps)
            if not self.summary.completed:
                self.summary.stopped_reason = "zone_time_cap"
            done = self.summary.steps_done
            message = (
                "Routine complete."
                if self.summary.completed
                else f"Routine over: {len(self._steps) - done} step(s) cut short by a time cap."
            )
            out.append(self._decision(DecisionKind.COMPLETE, at_s, "complete", message))
            return
        self._begin_step(out, at_s, DecisionKind.NEXT_STEP, "step_done")

    def _stop(
        self, out: list[Decision], at_s: float, reason: str, message: str, rule: str | None
    ) -> None:
        out.append(self._decision(DecisionKind.STOP, at_s, reason, message, rule))
        self._finished = True
        self.summary.stopped_reason = reason


@dataclass(frozen=True, slots=True)
class _Limits:
    pass_cap_s: Limit
    session_cap_s: Limit
    intensity_cap: Limit
