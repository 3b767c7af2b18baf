"""May this routine run now? Frequency rules, cool-downs after treatments, daily LED dose.

Pure: the caller passes the session history and the treatments the user recorded; the
answer lists every refusal with a message that says why and when it becomes possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from devicebridge.core.cooldown import local_time, routine_block
from devicebridge.core.policy import LED_CHANNELS, TREATMENTS, SafetyPolicy, policy_zone
from devicebridge.core.routine import DeviceKindName, Routine

DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class PastSession:
    started_at: datetime
    category: str
    device_kind: DeviceKindName
    completed: bool
    dose_j_cm2: dict[str, float] = field(default_factory=dict)


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
    reason: str  # frequency, cooldown, daily_dose
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


def check_admission(
    routine: Routine,
    policy: SafetyPolicy,
    *,
    now: datetime,
    history: Sequence[PastSession],
    treatments: Sequence[Treatment],
) -> Admission:
    refusals: list[Refusal] = []
    advice: list[Advice] = []

    if routine.schedule is not None:
        window = timedelta(days=routine.schedule.per_days)
        recent = sorted(
            s.started_at
            for s in history
            if s.category == routine.category and now - window < s.started_at <= now
        )
        if len(recent) >= routine.schedule.max_sessions:
            # The oldest session in the window must leave it before another may run.
            allowed_from = recent[len(recent) - routine.schedule.max_sessions] + window
            rule = policy.frequency.get(routine.category)
            refusals.append(
                Refusal(
                    "frequency",
                    f"{routine.name!r} ran {len(recent)} times in the last "
                    f"{routine.schedule.per_days:g} days "
                    f"(at most {routine.schedule.max_sessions}); "
                    f"the next session is allowed from {_when(allowed_from)}.",
                    allowed_from,
                    policy.cite(rule.max_sessions) if rule else "routine [schedule]",
                )
            )

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
            massaged = any(
                s.device_kind is DeviceKindName.MASSAGER and now - window <= s.started_at <= now
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
