"""The LED mask engine: the dose per wavelength, skin temperature, step timing.

Per sample: the dose per wavelength is integrated from the reported irradiance
(J/cm² = mW/cm² x s / 1000); at the per-session or remaining daily cap the step stops at the
cap; temperature warn lowers the irradiance, the stop level ends the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from devicebridge.core.engine.base import Engine
from devicebridge.core.engine.decisions import Decision, DecisionKind, completion
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy
from devicebridge.core.routine import J_PER_MJ, LedStep, Routine
from protocols.telemetry import IRRADIANCE_MW_CM2_PER_UNIT, TEMPERATURE_C_PER_UNIT

LOWERED_IRRADIANCE_FRACTION: Final = 0.5


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
        return completion(
            self.light_s,
            self.planned_light_s,
            every_step_done=self.completed and self.steps_done == self.steps_total,
        )


class LedEngine(Engine[LedStep]):
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
            ch: (samples[f"{ch}_centi_mw_cm2"] * IRRADIANCE_MW_CM2_PER_UNIT).tolist()
            for ch in LED_CHANNELS
        }
        temperature = (samples["skin_temperature_centi_c"] * TEMPERATURE_C_PER_UNIT).tolist()
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
