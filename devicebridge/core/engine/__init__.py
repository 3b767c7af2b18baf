"""The enforcement engines: telemetry samples in, decisions out. Pure and deterministic.

One engine per device kind, each in its module: :mod:`.massage` (massagers) and :mod:`.led`
(LED masks); :mod:`.base` holds what they share (the step list, the sample clock, the
decision log), :mod:`.decisions` what they decide, :mod:`.readings` what a sample's raw
fields mean. (Routines by time on devices that measure no pressure: ``core/timed.py``.)

Time is the device's sample clock: a sample's session time is its sequence distance from
the session's first sample divided by the sample rate, so decisions land at the same
virtual times on every run and do not depend on when batches reach the host.
"""

from __future__ import annotations

from collections.abc import Mapping

from devicebridge.core.engine.decisions import Decision, DecisionKind, PressureState
from devicebridge.core.engine.led import LOWERED_IRRADIANCE_FRACTION, LedEngine, LedSummary
from devicebridge.core.engine.massage import (
    OUT_OF_BAND_WARNING_DWELL_S,
    MassageEngine,
    MassageSummary,
)
from devicebridge.core.engine.readings import (
    ZONE_CODES,
    ZONE_NAMES,
)
from devicebridge.core.faults_detect import FaultChecks
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import DeviceKindName, Routine

__all__ = [
    "LOWERED_IRRADIANCE_FRACTION",
    "OUT_OF_BAND_WARNING_DWELL_S",
    "ZONE_CODES",
    "ZONE_NAMES",
    "Decision",
    "DecisionKind",
    "LedEngine",
    "LedSummary",
    "MassageEngine",
    "MassageSummary",
    "PressureState",
    "new_engine",
]


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
