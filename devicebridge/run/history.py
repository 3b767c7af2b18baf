"""What admission needs from the session store: past sessions, treatments and the LED
dose already received."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np

from devicebridge.core.admission import (
    Admission,
    PastSession,
    Treatment,
    check_admission,
    session_completion,
)
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy
from devicebridge.core.routine import (
    J_PER_MJ,
    DeviceKindName,
    Routine,
)
from devicebridge.storage.sessions import SessionStore
from protocols.telemetry import IRRADIANCE_MW_CM2_PER_UNIT

# Admission looks back at least a day (the daily LED dose), longer for frequency rules.
ADMISSION_MIN_LOOKBACK_DAYS: Final = 1.0


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def led_dose_of_samples(samples: np.ndarray[Any, Any], sample_rate_hz: float) -> dict[str, float]:
    """Dose per channel (J/cm²) delivered by LED mask samples."""
    dt_s = 1.0 / sample_rate_hz if sample_rate_hz > 0 else 0.0
    return {
        ch: float(samples[f"{ch}_centi_mw_cm2"].astype(np.float64).sum())
        * IRRADIANCE_MW_CM2_PER_UNIT
        * dt_s
        / J_PER_MJ
        for ch in LED_CHANNELS
    }


def admission_history(store: SessionStore, *, since: datetime) -> list[PastSession]:
    """Past sessions as admission sees them; refused attempts are not sessions.

    A session that ended without a summary (the bridge was stopped) gets its LED dose from
    its stored telemetry, so a crash never hides light from the daily cap.
    """
    history: list[PastSession] = []
    for row in store.admission_rows(since=since):
        try:
            kind = DeviceKindName(row.device_kind)
        except ValueError:
            continue
        dose = row.dose_j_cm2
        if kind is DeviceKindName.LED_MASK and dose is None:
            _, samples = store.telemetry(row.id)
            dose = led_dose_of_samples(samples, row.sample_rate_hz) if len(samples) else {}
        history.append(
            PastSession(
                _aware(row.started_at),
                row.category,
                kind,
                row.status == "completed",
                {str(k): float(v) for k, v in (dose or {}).items()},
                session_completion(row.completion),
            )
        )
    return history


def recorded_treatments(store: SessionStore) -> list[Treatment]:
    return [Treatment(t.kind, _aware(t.performed_at), t.zones) for t in store.treatments()]


def check_routine_admission(
    routine: Routine, policy: SafetyPolicy, store: SessionStore | None, *, now: datetime
) -> Admission:
    # Only the longest window any rule looks back over: reading every session ever stored
    # made each admission slower as the history grew (and held the event loop meanwhile).
    lookback_days = max(
        [ADMISSION_MIN_LOOKBACK_DAYS]
        + [rule.per_days.value for rule in policy.frequency.values()]
        + ([routine.schedule.per_days] if routine.schedule else [])
    )
    since = now - timedelta(days=lookback_days)
    history = admission_history(store, since=since) if store is not None else []
    treatments = recorded_treatments(store) if store is not None else []
    return check_admission(routine, policy, now=now, history=history, treatments=treatments)


def refusal_json(refusal: Any) -> dict[str, Any]:
    return {
        "reason": refusal.reason,
        "message": refusal.message,
        "allowed_from": refusal.allowed_from.isoformat() if refusal.allowed_from else None,
        "rule": refusal.rule,
    }
