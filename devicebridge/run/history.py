"""What admission needs from the session store: past sessions, treatments and the LED
dose already received."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from devicebridge.core.admission import (
    DAY,
    Admission,
    PastSession,
    Treatment,
    check_admission,
    history_span,
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


def admission_history(
    store: SessionStore,
    *,
    every_kind_since: datetime | None,
    dose_since: datetime,
    leave_out: Collection[int] = (),
) -> list[PastSession]:
    """Past sessions as admission sees them; refused attempts are not sessions.

    Those started since ``every_kind_since`` (None: none), and those with a dose started
    since ``dose_since``; not those of ``leave_out`` (runs still going, counted as
    admitted). A session that ended without a summary (the bridge was stopped) gets its LED
    dose from its stored telemetry, so a crash never hides light from the daily cap.
    """
    history: list[PastSession] = []
    for row in store.admission_rows(every_kind_since=every_kind_since, dose_since=dose_since):
        if row.id in leave_out:
            continue
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


def admitted_run(routine: Routine, now: datetime) -> PastSession:
    """A run admitted at ``now`` that has not ended, as admission counts it meanwhile: a
    whole session of its category, and, for light, all of its planned dose (the most it
    can deliver), until its stored summary says what it did."""
    planned_dose = (
        {ch: routine.dose_j_cm2(ch) for ch in LED_CHANNELS}
        if routine.device_kind is DeviceKindName.LED_MASK
        else {}
    )
    return PastSession(now, routine.category, routine.device_kind, False, planned_dose, None)


def check_routine_admission(
    routine: Routine,
    policy: SafetyPolicy,
    store: SessionStore | None,
    *,
    now: datetime,
    admitted: Sequence[tuple[PastSession, int | None]] = (),
) -> Admission:
    """Admission of ``routine`` at ``now`` against the stored history, and ``admitted``:
    runs admitted before it that have not ended (:func:`admitted_run`), each with the id of
    its stored session if it has one, which they stand for until they end."""
    leave_out = {session_id for _, session_id in admitted if session_id is not None}
    # Only the sessions admission can use: those within the windows that apply to this
    # routine, and the light of the last day. Reading more made each admission slower as
    # the history grew, in the process that commits every device's telemetry.
    span = history_span(routine, policy)
    history = (
        admission_history(
            store,
            every_kind_since=now - span if span else None,
            dose_since=now - DAY,
            leave_out=leave_out,
        )
        if store is not None
        else []
    ) + [run for run, _ in admitted]
    treatments = recorded_treatments(store) if store is not None else []
    return check_admission(routine, policy, now=now, history=history, treatments=treatments)


def refusal_json(refusal: Any) -> dict[str, Any]:
    return {
        "reason": refusal.reason,
        "message": refusal.message,
        "allowed_from": refusal.allowed_from.isoformat() if refusal.allowed_from else None,
        "rule": refusal.rule,
    }
