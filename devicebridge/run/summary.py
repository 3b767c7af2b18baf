"""What a session says of itself when it ends: the result of a run and its summary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devicebridge.core.engine import (
    Decision,
    LedEngine,
    MassageEngine,
)
from devicebridge.core.routine import (
    Routine,
)
from devicebridge.core.timed import TimedMassageEngine
from devicebridge.run.view import WARNING_KINDS
from devicebridge.storage.sessions import SessionStatus


@dataclass(frozen=True, slots=True)
class RunSummary:
    session_id: int | None
    status: SessionStatus
    end_reason: str | None
    summary: Mapping[str, Any]
    decisions: tuple[Decision, ...] = field(default=())

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def session_summary(
    engine: MassageEngine | LedEngine | TimedMassageEngine,
    routine: Routine,
    *,
    mode: str,
    samples: int,
    gaps: int,
    lost_samples: int,
    command_errors: int,
    checks: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What a finished (or interrupted) session says of itself: stored, shown, published.

    ``checks``: which safety checks applied and how (``"pressure": "not measured by this
    device"``: :func:`devicebridge.core.device_fit.checks_applied`)."""
    base: dict[str, Any] = {
        "routine": routine.name,
        "routine_version": routine.version,
        "device_kind": routine.device_kind.value,
        "mode": mode,
        "samples": samples,
        "steps_done": engine.summary.steps_done,
        "steps_total": engine.summary.steps_total,
        "completion": round(engine.summary.completion, 4),
        "completed": engine.summary.completed,
        "stopped_reason": engine.summary.stopped_reason,
        "warnings": sum(1 for d in engine.decisions if d.kind in WARNING_KINDS),
        "gaps": gaps,
        "lost_samples": lost_samples,
        "command_errors": command_errors,
    }
    if checks is not None:
        base["checks"] = dict(checks)
    if isinstance(engine, TimedMassageEngine):
        timed = engine.summary
        base.update(
            by_time=True,
            time_s=round(timed.time_s, 3),
            time_s_by_zone={z: round(v, 3) for z, v in timed.time_s_by_zone.items()},
            move_cues=timed.cues,
        )
    elif isinstance(engine, MassageEngine):
        s = engine.summary
        base.update(
            contact_s=round(s.contact_s, 3),
            time_in_band_s=round(s.time_in_band_s, 3),
            in_band_fraction=round(s.in_band_fraction, 4),
            out_of_band_events=s.out_of_band_events,
            cap_events=s.cap_events,
            contact_s_by_zone={z: round(v, 3) for z, v in s.contact_s_by_zone.items()},
        )
    else:
        led = engine.summary
        base.update(
            dose_j_cm2={ch: round(v, 4) for ch, v in led.dose_j_cm2.items()},
            dose_allowed_j_cm2={ch: round(v, 4) for ch, v in engine.dose_allowed_j_cm2.items()},
            light_s=round(led.light_s, 3),
            max_temperature_c=(
                round(led.max_temperature_c, 2) if math.isfinite(led.max_temperature_c) else None
            ),
        )
    return base
