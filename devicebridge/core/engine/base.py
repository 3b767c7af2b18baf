"""What the engines of every device kind share: the step list, the sample clock, the log."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Generic, TypeVar

from devicebridge.core.engine.decisions import Decision, DecisionKind
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import LedStep, MassageStep, Routine

StepT = TypeVar("StepT", MassageStep, LedStep)


class StepCursor(abc.ABC, Generic[StepT]):
    """What every engine keeps, whether it times a routine by the device's samples or by
    the host's clock: the steps of its device kind in the routine, which one runs, whether
    the routine is over, and the decisions made so far."""

    def __init__(self, routine: Routine, policy: SafetyPolicy, step_type: type[StepT]) -> None:
        self._steps: list[StepT] = [s for s in routine.steps if isinstance(s, step_type)]
        if not self._steps:
            raise ValueError(f"routine {routine.name!r} has no {step_type.__name__} steps")
        self.routine = routine
        self.policy = policy
        self.decisions: list[Decision] = []
        self._index = 0
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def step_number(self) -> int:
        return self._index + 1

    @property
    def current_step(self) -> StepT:
        return self._steps[min(self._index, len(self._steps) - 1)]


class Engine(StepCursor[StepT]):
    """An engine on the session's sample clock: a sample's session time is its sequence
    distance from the first sample divided by the sample rate."""

    def __init__(
        self, routine: Routine, policy: SafetyPolicy, step_type: type[StepT], sample_rate_hz: float
    ) -> None:
        StepCursor.__init__(self, routine, policy, step_type)
        self.dt_s = 1.0 / sample_rate_hz
        self._first_sequence: int | None = None

    @property
    def first_sequence(self) -> int | None:
        """The sequence number of the session's first sample (None before one was fed)."""
        return self._first_sequence

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
