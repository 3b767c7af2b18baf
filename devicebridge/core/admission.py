"""May this routine run now? Frequency rules, cool-downs after treatments, daily LED dose.

Pure: the caller passes the session history and the treatments the user recorded; the
answer lists every refusal with a message that says why and when it becomes possible.

Frequency: the policy's rules for the routine's category always apply (every rule at once
for a category the policy does not know), and the routine's own ``[schedule]`` on top.
What counts as a session (``docs/policy.md``, "What counts toward the frequency rules"):
refused attempts never do (they are not sessions); a session that delivered at least
``session.frequency_count_fraction`` of its planned contact or light time counts as one;
shorter ones add up, their fractions summed and each whole session's worth counted as one;
a session whose progress is unknown counts as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from devicebridge.core.cooldown import local_time, routine_block
from devicebridge.core.policy import LED_CHANNELS, TREATMENTS, SafetyPolicy, policy_zone
from devicebridge.core.routine import DeviceKindName, Routine
from devicebridge.core.tomlpath import is_real

DAY = timedelta(days=1)
# Sums of fractions such as 0.4 + 0.6 must reach 1 despite float rounding.
_FRACTION_EPSILON: Final = 1e-9


@dataclass(frozen=True, slots=True)
class PastSession:
    """A session as admission sees it.

    ``completion`` is the fraction (0..1) of its planned contact (massage) or light (LED)
    time the session delivered, as the engine's summary reports it; None when unknown (a
    session the bridge could not finish), which counts as a whole session.
    """

    started_at: datetime
    category: str
    device_kind: DeviceKindName
    completed: bool
    dose_j_cm2: dict[str, float] = field(default_factory=dict)
    completion: float | None = None


def history_span(routine: Routine, policy: SafetyPolicy) -> timedelta:
    """How far back :func:`check_admission` looks at past sessions of every kind for
    ``routine``: the frequency windows that apply to it and its sequencing window (zero
    when none does). Beyond that it only adds up the light of the last :data:`DAY`, which
    only sessions with a dose carry."""
    rules = policy.frequency_rules(routine.category)
    spans = [timedelta(days=rule.per_days.value) for rule in rules]
    if routine.schedule is not None:
        spans.append(timedelta(days=routine.schedule.per_days))
    if routine.device_kind is not DeviceKindName.MASSAGER and routine.sequencing is not None:
        spans.append(timedelta(minutes=routine.sequencing.within_min))
    return max(spans, default=timedelta(0))


def session_completion(value: object) -> float | None:
    """A stored session summary's ``completion`` value, or None when it is none we trust."""
    if not is_real(value) or not 0.0 <= value <= 1.0:
        return None
    return float(value)


def frequency_weight(session: PastSession, policy: SafetyPolicy) -> float:
    """How much of a session ``session`` is toward the frequency rules (0..1)."""
    if session.completed or session.completion is None or not math.isfinite(session.completion):
        return 1.0
    done = min(1.0, max(0.0, session.completion))
    return 1.0 if done >= policy.frequency_count_fraction.value else done


def counted_sessions(weights: Sequence[float]) -> int:
    """Sessions counted from their weights: the whole ones, plus the short ones' sum in
    whole sessions."""
    whole = sum(1 for w in weights if w >= 1.0)
    short = sum(w for w in weights if w < 1.0)
    return whole + math.floor(short + _FRACTION_EPSILON)


@dataclass(frozen=True, slots=True)
class Treatment:
    """An aesthetic treatment the user recorded (botulinum toxin, filler, ...)."""

    kind: str  # one of policy.TREATMENTS
    performed_at: datetime
    zones: tuple[str, ...]  # policy zones (left/right collapsed), e.g. ("cheek", "nasolabial")

    def __post_init__(self) -> None:
        if self.kind not in TREATMENTS:
            raise ValueError(f"unknown treatment {self.kind!r}; known: {', '.join(TREATMENTS)}")
        object.__setattr__(self, "zones", tuple(policy_zone(z) for z in self.zones))


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # frequency, cooldown, daily_dose, sequencing
    message: str
    allowed_from: datetime | None
    rule: str


@dataclass(frozen=True, slots=True)
class Advice:
    message: str


@dataclass(frozen=True)
class Admission:
    refusals: tuple[Refusal, ...]
    advice: tuple[Advice, ...]
    dose_today_j_cm2: dict[str, float]

    @property
    def allowed(self) -> bool:
        return not self.refusals


def _when(moment: datetime) -> str:
    return local_time(moment)  # as the cool-down messages show times


def _window_refusal(
    routine: Routine,
    weighted: Sequence[tuple[datetime, float]],
    *,
    now: datetime,
    max_sessions: int,
    per_days: int,
    rule: str,
    preface: str,
) -> Refusal | None:
    """A refusal when one more session would make more than ``max_sessions`` counted in
    the ``per_days`` days before it; it says when the next session is allowed."""
    window = timedelta(days=per_days)
    recent = sorted((at, w) for at, w in weighted if now - window < at <= now)
    counted = counted_sessions([w for _, w in recent])
    if counted < max_sessions:
        return None
    # Sessions leave the window oldest first; the next session is allowed once the ones
    # still in it count fewer than the limit.
    allowed_from = now
    for index, (at, _) in enumerate(recent):
        allowed_from = at + window
        if counted_sessions([w for _, w in recent[index + 1 :]]) < max_sessions:
            break
    return Refusal(
        "frequency",
        f"{preface}{routine.name!r}: "
        f"{counted} {routine.category!r} {'session counts' if counted == 1 else 'sessions count'}"
        f" in the last {per_days} day{'s' if per_days != 1 else ''} (at most {max_sessions}); "
        f"the next session is allowed from {_when(allowed_from)}.",
        allowed_from,
        rule,
    )


def _frequency_refusals(
    routine: Routine, policy: SafetyPolicy, now: datetime, history: Sequence[PastSession]
) -> list[Refusal]:
    preface = ""
    if not policy.knows_category(routine.category):
        preface = (
            f"{routine.category!r} is not a category the policy knows "
            f"(known: {', '.join(policy.known_categories)}), so every frequency rule applies; "
        )
    limits: list[tuple[int, int, str, str]] = []
    for rule in policy.frequency_rules(routine.category):
        limits.append(
            (
                int(rule.max_sessions.value),
                int(rule.per_days.value),
                policy.cite(rule.max_sessions),
                preface,
            )
        )
    schedule = routine.schedule
    # A schedule that repeats a policy rule adds nothing (and no second refusal).
    if schedule is not None and (schedule.max_sessions, schedule.per_days) not in {
        (m, d) for m, d, _, _ in limits
    }:
        limits.append((schedule.max_sessions, schedule.per_days, "routine [schedule]", ""))
    if not limits:
        return []  # a category without a frequency rule, and no schedule of its own
    weighted = [
        (s.started_at, frequency_weight(s, policy))
        for s in history
        if policy.counts_with(routine.category, s.category)
    ]
    refusals: list[Refusal] = []
    for max_sessions, per_days, rule_text, note in limits:
        refusal = _window_refusal(
            routine,
            weighted,
            now=now,
            max_sessions=max_sessions,
            per_days=per_days,
            rule=rule_text,
            preface=note,
        )
        if refusal is not None:
            refusals.append(refusal)
    return refusals


def check_admission(
    routine: Routine,
    policy: SafetyPolicy,
    *,
    now: datetime,
    history: Sequence[PastSession],
    treatments: Sequence[Treatment],
) -> Admission:
    refusals = _frequency_refusals(routine, policy, now, history)
    advice: list[Advice] = []

    is_massage = routine.device_kind is DeviceKindName.MASSAGER
    zones = set(routine.zones)
    for treatment in treatments:
        # The same block `treatment add` and `treatment list` state (core/cooldown.py).
        block = routine_block(policy, treatment.kind, treatment.performed_at, routine.device_kind)
        overlap = sorted(zones & set(treatment.zones))
        if block is not None and overlap and block.active_at(now):
            refusals.append(
                Refusal(
                    "cooldown",
                    f"{treatment.kind.replace('_', ' ')} on {', '.join(overlap)} on "
                    f"{_when(treatment.performed_at)}: {block.describe()}.",
                    block.until,
                    policy.cite(block.limit),
                )
            )

    # Light counts toward the daily dose however short the session was.
    day_start = now - DAY
    dose_today = dict.fromkeys(LED_CHANNELS, 0.0)
    for session in history:
        if day_start < session.started_at <= now:
            for channel, dose in session.dose_j_cm2.items():
                dose_today[channel] = dose_today.get(channel, 0.0) + dose
    if not is_massage:
        for channel in LED_CHANNELS:
            planned = routine.dose_j_cm2(channel)
            cap = policy.led[channel].dose_cap_day_j_cm2
            if planned and dose_today[channel] + planned > cap.value + 1e-9:
                oldest = min(
                    (
                        s.started_at
                        for s in history
                        if day_start < s.started_at <= now and s.dose_j_cm2.get(channel)
                    ),
                    default=now,
                )
                refusals.append(
                    Refusal(
                        "daily_dose",
                        f"{channel.replace('_', '-')} light: {dose_today[channel]:.1f} J/cm² "
                        "already "
                        f"in the last 24 h plus {planned:.1f} planned exceeds the daily "
                        f"{cap.value:g} J/cm²; allowed again from {_when(oldest + DAY)}.",
                        oldest + DAY,
                        policy.cite(cap),
                    )
                )
        if routine.sequencing is not None:
            window = timedelta(minutes=routine.sequencing.within_min)
            # A massage cut short before it counts is no massage to follow.
            massaged = any(
                s.device_kind is DeviceKindName.MASSAGER
                and now - window <= s.started_at <= now
                and frequency_weight(s, policy) >= 1.0
                for s in history
            )
            if not massaged:
                text = (
                    f"{routine.name!r} is meant to follow a massage within "
                    f"{routine.sequencing.within_min:g} min (LED after massage)."
                )
                if routine.sequencing.required:
                    refusals.append(Refusal("sequencing", text, None, "routine [sequencing]"))
                else:
                    advice.append(Advice(text))
    return Admission(tuple(refusals), tuple(advice), dose_today)
