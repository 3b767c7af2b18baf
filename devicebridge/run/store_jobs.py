"""A run's reads and writes of its store: jobs sent by name to the store writer's process
(:meth:`~devicebridge.storage.writer.StoreWriter.submit`), or run in the runner's process
on the store itself when the run has no writer (``RoutineRunner._on_store``).

A module of their own, and light: the writer's process imports the module of a job's
function when the job arrives, and the first job of a run (its session's record) waits
for it. Admission's rules are imported by the one job that needs them.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from devicebridge.storage.desk import StoreDesk

if TYPE_CHECKING:
    from devicebridge.core.admission import Admission
    from devicebridge.core.policy import SafetyPolicy
    from devicebridge.core.routine import Routine


def admit_on_store(
    desk: StoreDesk, routine: Routine, policy: SafetyPolicy, now: datetime, run_key: int
) -> Admission:
    """Admission against the store and the runs admitted on it that have not ended; an
    admitted run counts for the next admission at once, before its session is stored (two
    starts in one instant on two devices of one person are two sessions)."""
    from devicebridge.run.history import admitted_run, check_routine_admission

    admitted = desk.admitted_runs
    admission = check_routine_admission(
        routine, policy, desk.store, now=now, admitted=tuple(admitted.values())
    )
    if admission.allowed:
        admitted[run_key] = (admitted_run(routine, now), None)
    return admission


def start_session(desk: StoreDesk, record: dict[str, Any], run_key: int | None) -> int:
    session_id = desk.store.start_session(**record)
    if run_key is not None and run_key in desk.admitted_runs:
        # Until the run ends its record says less than the run will do (light so far, no
        # completion): admission counts the admitted run instead.
        admitted, _ = desk.admitted_runs[run_key]
        desk.admitted_runs[run_key] = (admitted, session_id)
    return session_id


def record_refused(
    desk: StoreDesk,
    record: dict[str, Any],
    end_reason: str,
    summary: dict[str, Any],
    at: datetime,
) -> int:
    session_id = desk.store.start_session(**record)
    desk.store.finish_session(
        session_id, status="refused", end_reason=end_reason, summary=summary, ended_at=at
    )
    return session_id


def mark_device_program(desk: StoreDesk, session_id: int, from_sequence: int) -> None:
    desk.store.mark_device_program(session_id, from_sequence)
