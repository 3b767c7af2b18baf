"""The session store on real SQLite files, including a writer killed mid-session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

import protocols as p
from devicebridge.core.admission import session_completion
from devicebridge.core.engine import Decision, DecisionKind
from devicebridge.errors import SessionStoreError
from devicebridge.storage.sessions import SessionStore


def batch(first: int, count: int) -> np.ndarray:
    samples = np.zeros(count, dtype=p.MASSAGER_SAMPLE_DTYPE)
    samples["pressure_dapa"] = np.arange(first, first + count) % 65536
    return samples


def open_session(store: SessionStore) -> int:
    return store.start_session(
        routine_name="Firming",
        category="firming",
        device_serial="SN-1",
        device_kind="massager",
        sample_format=p.SampleFormat.MASSAGER_V1,
        sample_rate_hz=100,
    )


def test_samples_come_back_in_order_once_each(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        session = open_session(store)
        store.append_samples(session, 20, batch(20, 10))
        store.append_samples(session, 0, batch(0, 10))
        store.append_samples(session, 10, batch(10, 10))
        store.append_samples(session, 10, batch(10, 10))  # re-sent after a backfill
        store.append_samples(session, 15, batch(15, 10))  # overlapping
        sequences, samples = store.telemetry(session)
        assert sequences.tolist() == list(range(30))
        assert samples["pressure_dapa"].tolist() == list(range(30))


def test_a_gap_stays_a_gap(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        session = open_session(store)
        store.append_samples(session, 40, batch(40, 5))
        store.append_samples(session, 0, batch(0, 10))
        sequences, samples = store.telemetry(session)
        assert sequences.tolist() == [*range(10), *range(40, 45)]
        assert samples["pressure_dapa"].tolist() == sequences.tolist()


def test_decisions_and_summary_round_trip(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        session = open_session(store)
        decisions = [
            Decision(
                DecisionKind.PAUSE,
                1.5,
                2,
                "pressure_cap",
                "too hard",
                "zones.eye_area.cap_kpa",
                150,
            ),
            Decision(DecisionKind.RESUME, 2.0, 2, "pressure_cap", "Resuming.", None, 200),
        ]
        store.append_decisions(session, decisions[:1])
        store.append_decisions(session, decisions[1:])
        store.finish_session(
            session, status="completed", end_reason=None, summary={"completion": 1.0}
        )
        stored = store.decisions(session)
        assert [(d.kind, d.at_s, d.sequence) for d in stored] == [
            ("pause", 1.5, 150),
            ("resume", 2.0, 200),
        ]
        record = store.session(session)
        assert record.status == "completed"
        assert record.summary == {"completion": 1.0}
        assert record.ended_at is not None


def test_treatments_are_kept(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        when = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
        store.add_treatment("filler", when, ["cheek", "nasolabial"], "lips too")
        (treatment,) = store.treatments()
        assert (treatment.kind, treatment.performed_at, treatment.zones) == (
            "filler",
            when,
            ("cheek", "nasolabial"),
        )


def test_unknown_session_and_newer_schema_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with SessionStore(path) as store, pytest.raises(SessionStoreError, match="no session 42"):
        store.session(42)
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(SessionStoreError, match="newer than this devicebridge knows"):
        SessionStore(path)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, protocols as p
    from devicebridge.storage.sessions import SessionStore
    store = SessionStore(__import__("pathlib").Path(sys.argv[1]))
    session = store.start_session(routine_name="r", category="c", device_serial="S",
        device_kind="massager", sample_format=p.SampleFormat.MASSAGER_V1, sample_rate_hz=100)
    sequence = 0
    while True:
        samples = np.zeros(10, dtype=p.MASSAGER_SAMPLE_DTYPE)
        samples["pressure_dapa"] = np.arange(sequence, sequence + 10) % 65536
        store.append_samples(session, sequence, samples)
        sequence += 10
        print(sequence, flush=True)  # every sample below this is committed
    """
)


def test_a_killed_bridge_leaves_an_interrupted_session_with_every_received_sample(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    committed = 0
    for line in writer.stdout:
        committed = int(line)
        if committed >= 2000:
            break
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    with SessionStore(path) as store:
        assert store.recover() == [1]
        record = store.session(1)
        assert record.status == "interrupted"
        sequences, samples = store.telemetry(1)
        assert sequences.shape[0] >= committed
        assert sequences.tolist() == list(range(sequences.shape[0]))
        assert samples["pressure_dapa"].tolist() == [s % 65536 for s in range(sequences.shape[0])]
        assert store.recover() == []


def test_sessions_since_keeps_only_the_window(tmp_path: Path) -> None:
    from datetime import timedelta

    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    with SessionStore(tmp_path / "s.sqlite3") as store:
        for days_ago in (30, 8, 6, 1):
            store.start_session(
                routine_name=f"{days_ago} days ago",
                category="firming",
                device_serial="SN-1",
                device_kind="massager",
                sample_format=p.SampleFormat.MASSAGER_V1,
                sample_rate_hz=100,
                started_at=now - timedelta(days=days_ago),
            )
        recent = store.sessions(since=now - timedelta(days=7))
        assert [r.routine_name for r in recent] == ["1 days ago", "6 days ago"]
        assert len(store.sessions()) == 4


SUMMARIES: list[tuple[str, dict[str, object]]] = [
    ("completed", {"completion": 1.0, "dose_j_cm2": {"red": 12.5, "nir": 3}}),
    ("stopped", {"completion": 0.25, "zones": {"cheek": {"mean_kpa": 5.0}}}),
    ("stopped", {"completion": True}),  # not a number: admission does not trust it
    ("stopped", {"completion": 2, "dose_j_cm2": [1.0]}),  # a list is no dose
    ("interrupted", {}),  # ended without a summary
    # NaN is not JSON to SQLite: this one is read whole, as sessions() reads it
    ("stopped", {"completion": 0.5, "mean_kpa": float("nan"), "dose_j_cm2": {"red": 1.0}}),
    ("refused", {"refusals": []}),  # never a session for admission
]


def test_admission_reads_of_each_session_what_the_whole_record_says(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        start = datetime(2026, 3, 1, tzinfo=UTC)
        for hour, (status, summary) in enumerate(SUMMARIES):
            session = store.start_session(
                routine_name="r",
                category="Firming",
                device_serial="SN-1",
                device_kind="led_mask",
                sample_format=p.SampleFormat.LED_MASK_V1,
                sample_rate_hz=50,
                started_at=start.replace(hour=hour),
            )
            store.finish_session(session, status=status, end_reason=None, summary=summary)
        since = start.replace(hour=1)
        rows = store.admission_rows(every_kind_since=since, dose_since=since)
        records = [r for r in store.sessions(since=since) if r.status != "refused"]
        assert [row.id for row in rows] == [r.id for r in records]
        for row, record in zip(rows, records, strict=True):
            dose = record.summary.get("dose_j_cm2")
            assert row.dose_j_cm2 == (dose if isinstance(dose, dict) else None)
            assert session_completion(row.completion) == session_completion(
                record.summary.get("completion")
            )
            assert (row.started_at, row.category, row.device_kind, row.status) == (
                record.started_at,
                record.category,
                record.device_kind,
                record.status,
            )
            assert row.sample_rate_hz == record.sample_rate_hz
        completions = [session_completion(row.completion) for row in rows]
        assert completions[::-1] == [0.25, None, None, None, 0.5]
