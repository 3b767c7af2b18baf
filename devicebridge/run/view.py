"""What a live view shows of a running routine, derived from the engine's state and
decisions (never counted twice)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from devicebridge.core.actuation import (
    SAFETY_KINDS,
)
from devicebridge.core.engine import (
    Decision,
    DecisionKind,
    PressureState,
)
from devicebridge.core.routine import (
    DeviceKindName,
)
from devicebridge.core.timed import MOVE_CUE

# Decisions the live view counts as warnings.
WARNING_KINDS: Final = frozenset({DecisionKind.WARNING, DecisionKind.LOWER_INTENSITY})


@dataclass(frozen=True, slots=True)
class RunnerState:
    """What the UI shows; derived from the engine whenever it is asked for."""

    device: str
    routine: str
    device_kind: DeviceKindName
    step: int
    steps_total: int
    zone: str | None
    guidance: str
    step_remaining_s: float
    session_remaining_s: float
    elapsed_s: float
    paused: bool = False
    finished: bool = False
    pressure_kpa: float | None = None
    pressure_state: PressureState | None = None
    band_kpa: tuple[float, float] | None = None  # the step's target band
    cap_kpa: float | None = None  # the policy cap of the zone under the head
    contact: bool | None = None
    skin_temperature_c: float | None = None
    irradiance_mw_cm2: Mapping[str, float] | None = None
    dose_j_cm2: Mapping[str, float] | None = None
    dose_allowed_j_cm2: Mapping[str, float] | None = None
    last_warning: str | None = None
    warnings: int = 0
    gaps: int = 0
    mode: str = "host"
    # What this device cannot measure, so the view shows no gauge for it ("pressure").
    not_measured: tuple[str, ...] = ()
    by_time: bool = False  # guidance by the host clock (no contact sensing)


@dataclass(slots=True)
class Guidance:
    """What the live view says, folded from the engine's decisions as they come."""

    seen: int = 0  # decisions folded so far
    text: str = ""  # what to do now
    step_text: str = ""  # the guidance of the step in progress
    last_warning: str | None = None
    warnings: int = 0

    def fold(self, decisions: Sequence[Decision]) -> None:
        for decision in decisions[self.seen :]:
            kind = decision.kind
            if kind in WARNING_KINDS:
                self.warnings += 1
                self.last_warning = decision.message
                continue
            if kind is DecisionKind.NEXT_STEP or decision.reason == "step_start":
                self.step_text = decision.message
            if kind in SAFETY_KINDS:
                self.last_warning = decision.message
            if kind is DecisionKind.GUIDANCE and decision.reason == MOVE_CUE:
                self.text = decision.message  # a cue by time, not a warning
            elif kind is DecisionKind.GUIDANCE and decision.reason != "step_start":
                self.last_warning = decision.message  # a hint such as "wrong zone"
            elif kind is DecisionKind.RESUME:
                self.text = self.step_text  # back to the step after a pause
            else:
                self.text = decision.message
        self.seen = len(decisions)
