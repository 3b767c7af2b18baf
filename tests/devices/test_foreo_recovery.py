"""A bridge killed during a session by time: the record is closed as interrupted with the
summary up to the last decision it stored, like any session's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from devicebridge.core.policy import default_policy
from devicebridge.core.timed import TimedMassageEngine
from devicebridge.reporting.report import load_report, summary_lines
from devicebridge.run.recovery import recover_sessions
from devicebridge.storage.sessions import SessionStore
from protocols import SampleFormat

from .conftest import timed_routine, timed_step


def test_a_killed_session_by_time_is_summarised_up_to_its_last_decision(tmp_path: Path) -> None:
    policy = default_policy()
    routine = timed_routine(policy, timed_step("cheek_left", 40, 5) + timed_step("chin", 20, 4))
    path = tmp_path / "sessions.sqlite3"
    with SessionStore(path) as store:
        # What the runner had stored when the process died, 47 s in: the session (no sample
        # rate: the device streams nothing) and the decisions up to then.
        session_id = store.start_session(
            routine_name=routine.name,
            category=routine.category,
            device_serial="foreo@SI:MU:00:00:00:01",
            device_kind="massager",
            sample_format=SampleFormat.MASSAGER_V1,
            sample_rate_hz=0.0,
            routine_text=routine.source_text,
        )
        engine = TimedMassageEngine(routine, policy)
        engine.start()
        engine.tick(47.0)
        store.append_decisions(session_id, engine.decisions)
    with sqlite3.connect(path) as db:  # the process that ran it is gone
        db.execute("UPDATE sessions SET owner_pid = NULL")
    with SessionStore(path) as store:
        (record,) = recover_sessions(store, policy)
        assert record.status == "interrupted"
        summary = record.summary
        # The last decision stored is the zone change at 40 s: it got at least that far.
        assert summary["time_s_by_zone"] == {"cheek_left": 40.0}
        assert summary["steps_done"] == 1
        assert summary["completion"] == round(40.0 / 60.0, 4)
        assert summary["time_s_lower_bound"] is True
        assert summary["checks"]["pressure"] == "not measured by this device"
        lines = summary_lines(load_report(store, record.id, policy))
    assert "pressure: not measured by this device" in lines
    assert "  cheek_left: 40.0 s" in lines
