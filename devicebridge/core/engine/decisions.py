"""What an engine decides: the kinds of decision, the decision itself, the pressure states,
and how much of its plan a session did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum


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


def completion(done: float, planned: float, *, every_step_done: bool) -> float:
    """The fraction of a session's plan done: 1.0 once every step is done, else what was
    done over what was planned (0.0 with nothing planned), at most 1.0."""
    if every_step_done:
        return 1.0
    if not planned:
        return 0.0
    return min(1.0, done / planned)
