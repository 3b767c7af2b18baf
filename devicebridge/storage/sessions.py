"""Session records and their telemetry, stored so that an abrupt stop loses nothing.

One SQLite file (WAL) holds the session records, the decisions the engine took, the
treatments the user recorded, and the telemetry as compact arrays: BLOBs of raw protocol
samples (9 or 10 bytes each), one per batch, or one per run of contiguous batches that a
writer commits together.
:meth:`SessionStore.append_samples` commits each batch before it returns, so a killed
process keeps every sample stored so far; :meth:`SessionStore.append_many` commits many
batches in one transaction for a writer that groups commits (the store writer's process
commits every 0.25 s what the bridge sent it: a killed bridge loses at most that last
quarter second of telemetry). On the
next start :meth:`SessionStore.recover` marks sessions left ``running`` as
``interrupted``; their committed samples are all there.

A running session's chunks are stored raw (cheap to write while the samples stream in);
once it has ended, :meth:`SessionStore.compact_telemetry` rewrites them as a few large
compressed chunks (field planes, zlib: :mod:`devicebridge.storage.sample_codec`), in one
transaction. Raw chunks (of a running session, or of a store from before schema version 3)
and compressed ones read the same way.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from devicebridge.errors import SessionStoreError
from devicebridge.storage.lock import mark_process_alive, process_alive
from devicebridge.storage.sample_codec import SampleEncoding, decode_samples, encode_samples
from devicebridge.storage.sqlite import connect, migrate
from protocols import SampleFormat

if TYPE_CHECKING:
    # numpy loads with the first telemetry written or read, so that listing sessions
    # (devicebridge history) starts without it.
    import numpy as np
    import numpy.typing as npt

SESSIONS_FILENAME: Final = "sessions.sqlite3"
SessionStatus = Literal["running", "completed", "stopped", "interrupted", "refused"]

_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE sessions (
        id             INTEGER PRIMARY KEY,
        routine_name   TEXT NOT NULL,
        category       TEXT NOT NULL,
        device_serial  TEXT NOT NULL,
        device_kind    TEXT NOT NULL,
        sample_format  INTEGER NOT NULL,
        sample_rate_hz REAL NOT NULL,
        started_at     TEXT NOT NULL,
        ended_at       TEXT,
        status         TEXT NOT NULL CHECK (status IN
                           ('running', 'completed', 'stopped', 'interrupted', 'refused')),
        end_reason     TEXT,
        summary_json   TEXT NOT NULL DEFAULT '{}',
        routine_text   TEXT NOT NULL DEFAULT '',
        program_id     TEXT
    );
    CREATE TABLE telemetry_chunks (
        session_id     INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        first_sequence INTEGER NOT NULL,
        sample_count   INTEGER NOT NULL,
        received_at    TEXT NOT NULL,
        samples        BLOB NOT NULL,
        PRIMARY KEY (session_id, first_sequence)
    );
    CREATE TABLE decisions (
        session_id INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        position   INTEGER NOT NULL,
        at_s       REAL NOT NULL,
        kind       TEXT NOT NULL,
        step       INTEGER NOT NULL,
        reason     TEXT NOT NULL,
        message    TEXT NOT NULL,
        rule       TEXT,
        sequence   INTEGER,
        PRIMARY KEY (session_id, position)
    );
    CREATE TABLE treatments (
        id           INTEGER PRIMARY KEY,
        kind         TEXT NOT NULL,
        performed_at TEXT NOT NULL,
        zones        TEXT NOT NULL,
        note         TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sessions_by_start ON sessions (started_at);
    """,
    # The device sample from which the device ran the session's routine as its program
    # (NULL: the host drove it): a bridge that stops mid-session knows from where the
    # device went on alone.
    # ``owner_pid``: the process that runs the session, so that recovery leaves alone the
    # sessions of another process still running them.
    """
    ALTER TABLE sessions ADD COLUMN device_program_from INTEGER;
    ALTER TABLE sessions ADD COLUMN owner_pid INTEGER;
    """,
    # How a chunk's samples are stored (devicebridge.storage.sample_codec): 0 raw, as
    # every chunk before this version; a finished session's chunks are compressed.
    """
    ALTER TABLE telemetry_chunks ADD COLUMN encoding INTEGER NOT NULL DEFAULT 0;
    """,
)
# A finished session's telemetry is rewritten in chunks of at most this many samples.
COMPACT_CHUNK_SAMPLES: Final = 8192


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: int
    routine_name: str
    category: str
    device_serial: str
    device_kind: str
    sample_format: SampleFormat
    sample_rate_hz: float
    started_at: datetime
    ended_at: datetime | None
    status: SessionStatus
    end_reason: str | None
    summary: Mapping[str, Any]
    routine_text: str
    program_id: str | None
    device_program_from: int | None = None  # see mark_device_program


@dataclass(frozen=True, slots=True)
class AdmissionRow:
    """The part of a stored session admission reads (:meth:`SessionStore.admission_rows`)."""

    id: int
    started_at: datetime
    category: str
    device_kind: str
    status: SessionStatus
    sample_rate_hz: float
    dose_j_cm2: dict[str, Any] | None  # the summary's, when it has one
    completion: Any  # the summary's ``completion`` as stored (checked by admission)


@dataclass(frozen=True, slots=True)
class StoredDecision:
    at_s: float
    kind: str
    step: int
    reason: str
    message: str
    rule: str | None
    sequence: int | None


@dataclass(frozen=True, slots=True)
class StoredTreatment:
    id: int
    kind: str
    performed_at: datetime
    zones: tuple[str, ...]
    note: str


@dataclass(frozen=True, slots=True)
class SampleChunk:
    """One batch for :meth:`SessionStore.append_many`."""

    session_id: int
    first_sequence: int
    samples: npt.NDArray[np.void]
    received_at: datetime


# One stored decision: at_s, kind, step, reason, message, rule, sequence (the fields of
# StoredDecision, as a tuple: a store writer's rows cross to its process as builtins).
DecisionRow = tuple[float, str, int, str, str, str | None, int | None]
# One stored chunk of raw samples: session id, first sequence, sample count, received at
# (ISO 8601, UTC), the samples' bytes (a store writer's rows, built where they are added).
ChunkRow = tuple[int, int, int, str, bytes]


def _now() -> datetime:
    return datetime.now(UTC)


def decision_row(decision: Any) -> DecisionRow:
    """An engine decision (or anything with the fields of StoredDecision) as stored."""
    d = decision
    return (d.at_s, str(d.kind), d.step, d.reason, d.message, d.rule, d.sequence)


class SessionStore:
    """Owns one connection; use from one thread (the event loop's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = connect(path)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise SessionStoreError(f"cannot open the session store: {exc}", path=path) from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SessionStoreError(str(exc), path=self.path) from exc

    def _migrate(self) -> None:
        newer = migrate(self._db, _MIGRATIONS)
        if newer is not None:
            raise SessionStoreError(
                f"schema version {newer} is newer than this devicebridge knows "
                f"({len(_MIGRATIONS)}); upgrade devicebridge",
                path=self.path,
            )

    # ------------------------------------------------------------------ sessions
    def start_session(
        self,
        *,
        routine_name: str,
        category: str,
        device_serial: str,
        device_kind: str,
        sample_format: SampleFormat,
        sample_rate_hz: float,
        routine_text: str = "",
        program_id: str | None = None,
        started_at: datetime | None = None,
        owner_pid: int | None = None,
    ) -> int:
        """A session ``running`` from ``started_at`` (now), owned by process ``owner_pid``
        (this one by default, marked alive here; another must have marked itself: the
        bridge whose store writer's process stores it, see :func:`mark_process_alive`)."""
        if owner_pid is None or owner_pid == os.getpid():
            mark_process_alive(self.path.parent)
            owner_pid = os.getpid()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO sessions (routine_name, category, device_serial, device_kind,"
                " sample_format, sample_rate_hz, started_at, status, routine_text, program_id,"
                " owner_pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (
                    routine_name,
                    category,
                    device_serial,
                    device_kind,
                    int(sample_format),
                    sample_rate_hz,
                    (started_at or _now()).isoformat(),
                    routine_text,
                    program_id,
                    owner_pid,
                ),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def mark_device_program(self, session_id: int, from_sequence: int) -> None:
        """The device runs the session's routine as its program from sample
        ``from_sequence`` on (with no host, it goes on alone from there)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE sessions SET device_program_from = ? WHERE id = ?",
                (from_sequence, session_id),
            )

    def append_samples(
        self, session_id: int, first_sequence: int, samples: npt.NDArray[np.void]
    ) -> None:
        """Store one batch at once (committed before returning). Re-sent batches are ignored."""
        import numpy as np

        if samples.shape[0] == 0:
            return
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO telemetry_chunks"
                " (session_id, first_sequence, sample_count, received_at, samples)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    session_id,
                    first_sequence,
                    int(samples.shape[0]),
                    _now().isoformat(),
                    np.ascontiguousarray(samples).tobytes(),
                ),
            )

    def append_many(
        self,
        chunks: Sequence[SampleChunk],
        decisions: Sequence[tuple[int, Sequence[Any]]] = (),
    ) -> None:
        """Batches and decision lists (in order, per session) in one transaction.

        The same rows as :meth:`append_samples` and :meth:`append_decisions`, one commit.
        """
        import numpy as np

        self.append_rows(
            [
                (
                    c.session_id,
                    c.first_sequence,
                    int(c.samples.shape[0]),
                    c.received_at.isoformat(),
                    np.ascontiguousarray(c.samples).tobytes(),
                )
                for c in chunks
            ],
            [(session_id, [decision_row(d) for d in items]) for session_id, items in decisions],
        )

    def append_rows(
        self,
        rows: Sequence[ChunkRow],
        decisions: Sequence[tuple[int, Sequence[DecisionRow]]] = (),
    ) -> None:
        """:meth:`append_many` of chunks and decisions already made rows (empty chunks
        are skipped)."""
        rows = [row for row in rows if row[2]]
        if not rows and not any(items for _, items in decisions):
            return
        # One insert per session for its decision lists (in order): fewer statements.
        by_session: dict[int, list[DecisionRow]] = {}
        for session_id, items in decisions:
            by_session.setdefault(session_id, []).extend(items)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO telemetry_chunks"
                " (session_id, first_sequence, sample_count, received_at, samples)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            for session_id, items in by_session.items():
                if items:
                    self._insert_decisions(db, session_id, items)

    def append_decisions(self, session_id: int, decisions: Sequence[Any]) -> None:
        """Store engine decisions (objects with the fields of StoredDecision)."""
        if not decisions:
            return
        with self._transaction() as db:
            self._insert_decisions(db, session_id, [decision_row(d) for d in decisions])

    @staticmethod
    def _insert_decisions(
        db: sqlite3.Connection, session_id: int, decisions: Sequence[DecisionRow]
    ) -> None:
        (position,) = db.execute(
            "SELECT COALESCE(MAX(position), -1) + 1 FROM decisions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        db.executemany(
            "INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(session_id, position + i, *row) for i, row in enumerate(decisions)],
        )

    def finish_session(
        self,
        session_id: int,
        *,
        status: SessionStatus,
        end_reason: str | None,
        summary: Mapping[str, Any],
        ended_at: datetime | None = None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE sessions SET status = ?, end_reason = ?, ended_at = ?, summary_json = ?"
                " WHERE id = ?",
                (
                    status,
                    end_reason,
                    (ended_at or _now()).isoformat(),
                    json.dumps(summary, sort_keys=True),
                    session_id,
                ),
            )

    def recover(self) -> list[int]:
        """Mark sessions left ``running`` by a stopped process as ``interrupted``; those of a
        process still running them (another command on this data directory) stay."""
        folder = self.path.parent
        with self._transaction() as db:
            rows = db.execute("SELECT id, owner_pid FROM sessions WHERE status = 'running'")
            ids = [
                session_id
                for session_id, pid in rows.fetchall()
                if pid is None or not process_alive(folder, int(pid))
            ]
            db.executemany(
                "UPDATE sessions SET status = 'interrupted',"
                " end_reason = COALESCE(end_reason, 'bridge stopped during the session')"
                " WHERE id = ?",
                [(session_id,) for session_id in ids],
            )
        return ids

    def session(self, session_id: int) -> SessionRecord:
        row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionStoreError(f"no session {session_id}", path=self.path)
        return _record(row)

    def sessions(
        self, *, limit: int | None = None, since: datetime | None = None
    ) -> list[SessionRecord]:
        """Newest first; ``since`` keeps those started at or after it (a UTC time)."""
        query = "SELECT * FROM sessions"
        params: tuple[str, ...] = ()
        if since is not None:
            # Start times are stored as UTC ISO 8601 strings, which sort like the times.
            query += " WHERE started_at >= ?"
            params = (since.astimezone(UTC).isoformat(),)
        query += " ORDER BY started_at DESC, id DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        return [_record(r) for r in self._db.execute(query, params).fetchall()]

    def admission_rows(
        self, *, every_kind_since: datetime | None, dose_since: datetime
    ) -> list[AdmissionRow]:
        """What admission reads of past sessions, refused attempts left out: those started
        since ``every_kind_since`` (None: none), and since ``dose_since`` those that may
        carry light (LED sessions, and any whose summary has a dose). A few columns and two
        values of the summary, taken out by SQLite, not whole records: admission runs
        before every session, in the process that commits every device's telemetry. A
        summary SQLite does not take for JSON (Python wrote a NaN in it) is read whole, as
        :meth:`sessions` reads it."""
        earliest = dose_since if every_kind_since is None else min(every_kind_since, dose_since)
        every_kind = "started_at >= :every OR " if every_kind_since is not None else ""
        rows = self._db.execute(
            "SELECT id, started_at, category, device_kind, status, sample_rate_hz, valid,"
            " CASE WHEN valid AND json_type(summary_json, '$.dose_j_cm2') = 'object'"
            "  THEN json_extract(summary_json, '$.dose_j_cm2') END,"
            " CASE WHEN valid AND json_type(summary_json, '$.completion') IN ('integer', 'real')"
            "  THEN json_extract(summary_json, '$.completion') END,"
            " CASE WHEN valid THEN NULL ELSE summary_json END"
            " FROM (SELECT *, json_valid(summary_json) AS valid FROM sessions"
            "  WHERE started_at >= :earliest AND status != 'refused')"
            f" WHERE {every_kind}device_kind = 'led_mask' OR CASE WHEN valid"
            "  THEN json_type(summary_json, '$.dose_j_cm2') = 'object' ELSE 1 END"
            " ORDER BY started_at DESC, id DESC",
            {
                "earliest": earliest.astimezone(UTC).isoformat(),
                "every": (every_kind_since or earliest).astimezone(UTC).isoformat(),
            },
        ).fetchall()
        found: list[AdmissionRow] = []
        for id_, started, category, kind, status, rate, _, dose, completion, whole in rows:
            if whole is not None:
                summary = json.loads(whole)
                dose = summary.get("dose_j_cm2")
                dose_j_cm2 = dose if isinstance(dose, dict) else None
                completion = summary.get("completion")
            else:
                dose_j_cm2 = json.loads(dose) if dose is not None else None
            found.append(
                AdmissionRow(
                    id_,
                    datetime.fromisoformat(started),
                    category,
                    kind,
                    status,
                    rate,
                    dose_j_cm2,
                    completion,
                )
            )
        return found

    def telemetry(self, session_id: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.void]]:
        """(sequences, samples) of a session, in sequence order, each sample once."""
        import numpy as np

        from protocols.telemetry import SAMPLE_DTYPES

        row = self._db.execute(
            "SELECT sample_format FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise SessionStoreError(f"no session {session_id}", path=self.path)
        dtype = SAMPLE_DTYPES[SampleFormat(row[0])]
        chunks = self._db.execute(
            "SELECT first_sequence, sample_count, encoding, samples FROM telemetry_chunks"
            " WHERE session_id = ? ORDER BY first_sequence",
            (session_id,),
        ).fetchall()
        if not chunks:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=dtype)
        blobs = [
            blob
            if encoding == SampleEncoding.RAW
            else self._decoded(blob, encoding, dtype, count).tobytes()
            for _, count, encoding, blob in chunks
        ]
        counts = np.fromiter(
            (len(blob) // dtype.itemsize for blob in blobs), dtype=np.int64, count=len(chunks)
        )
        firsts = np.fromiter((c[0] for c in chunks), dtype=np.uint64, count=len(chunks))
        # One buffer and one view: concatenating thousands of small structured arrays costs
        # a dtype promotion per array.
        samples = np.frombuffer(b"".join(blobs), dtype=dtype)
        offsets = np.repeat(np.cumsum(counts) - counts, counts).astype(np.uint64)
        sequences = np.repeat(firsts, counts) + (
            np.arange(int(counts.sum()), dtype=np.uint64) - offsets
        )
        if sequences.shape[0] < 2 or bool(np.all(sequences[1:] > sequences[:-1])):
            return sequences, samples.copy()
        # Overlapping chunks (a backfill that re-sent samples) keep the first copy.
        unique, index = np.unique(sequences, return_index=True)
        return unique, samples[index]

    def _decoded(
        self, blob: bytes, encoding: int, dtype: np.dtype[np.void], count: int
    ) -> npt.NDArray[np.void]:
        try:
            return decode_samples(blob, encoding, dtype, count)
        except ValueError as exc:
            raise SessionStoreError(f"telemetry unreadable: {exc}", path=self.path) from exc

    def compact_telemetry(
        self, session_id: int, *, chunk_samples: int = COMPACT_CHUNK_SAMPLES
    ) -> int:
        """Rewrite a session's telemetry as compressed chunks of contiguous samples (at
        most ``chunk_samples`` each); returns the chunks written.

        For a session that has ended: what it stored reads back the same (each sample
        once, in order). The samples are read and compressed outside any transaction; the
        swap is one short transaction, skipped (returning 0) if chunks came or went in
        between. A session whose chunks are all compressed already is left alone.
        """
        import numpy as np

        stored = self._chunk_state(session_id)
        if not stored[2]:
            return 0  # no raw chunk
        received = self._db.execute(
            "SELECT first_sequence, received_at FROM telemetry_chunks"
            " WHERE session_id = ? ORDER BY first_sequence",
            (session_id,),
        ).fetchall()
        sequences, samples = self.telemetry(session_id)
        # Where the sequence jumps (a gap) a chunk must end: chunks are contiguous.
        total = int(sequences.shape[0])
        runs = [0, *(np.flatnonzero(np.diff(sequences) != 1) + 1).tolist(), total]
        starts = [
            start
            for run_start, run_end in itertools.pairwise(runs)
            for start in range(run_start, run_end, chunk_samples)
        ]
        firsts = np.fromiter((r[0] for r in received), dtype=np.uint64, count=len(received))
        rows = []
        for start, end in zip(starts, [*starts[1:], total], strict=True):
            # When the chunk's first sample came: that of the chunk it was stored in.
            origin = int(np.searchsorted(firsts, sequences[start], side="right")) - 1
            rows.append(
                (
                    session_id,
                    int(sequences[start]),
                    end - start,
                    received[max(origin, 0)][1],
                    encode_samples(samples[start:end], SampleEncoding.PLANES_ZLIB),
                    int(SampleEncoding.PLANES_ZLIB),
                )
            )
        with self._transaction() as db:
            if self._chunk_state(session_id) != stored:
                return 0  # written to meanwhile: compacted another time
            db.execute("DELETE FROM telemetry_chunks WHERE session_id = ?", (session_id,))
            db.executemany(
                "INSERT INTO telemetry_chunks"
                " (session_id, first_sequence, sample_count, received_at, samples, encoding)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def _chunk_state(self, session_id: int) -> tuple[int, int, int]:
        """(chunks, samples, raw chunks) of a session: what a compaction must find unchanged."""
        chunks, samples, raw = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(sample_count), 0),"
            " COALESCE(SUM(encoding = ?), 0) FROM telemetry_chunks WHERE session_id = ?",
            (int(SampleEncoding.RAW), session_id),
        ).fetchone()
        return int(chunks), int(samples), int(raw)

    def decisions(self, session_id: int) -> list[StoredDecision]:
        rows = self._db.execute(
            "SELECT at_s, kind, step, reason, message, rule, sequence FROM decisions"
            " WHERE session_id = ? ORDER BY position",
            (session_id,),
        ).fetchall()
        return [StoredDecision(*row) for row in rows]

    # ------------------------------------------------------------------ treatments
    def add_treatment(
        self, kind: str, performed_at: datetime, zones: Sequence[str], note: str = ""
    ) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO treatments (kind, performed_at, zones, note) VALUES (?, ?, ?, ?)",
                (kind, performed_at.isoformat(), json.dumps(list(zones)), note),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def remove_treatment(self, treatment_id: int) -> StoredTreatment:
        """Forget a treatment (recorded by mistake); returns what was removed."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, kind, performed_at, zones, note FROM treatments WHERE id = ?",
                (treatment_id,),
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM treatments WHERE id = ?", (treatment_id,))
        if row is None:
            raise SessionStoreError(
                f"no treatment {treatment_id} (devicebridge treatment list)", path=self.path
            )
        return _treatment(row)

    def treatments(self) -> list[StoredTreatment]:
        rows = self._db.execute(
            "SELECT id, kind, performed_at, zones, note FROM treatments ORDER BY performed_at"
        ).fetchall()
        return [_treatment(row) for row in rows]


def _treatment(row: tuple[Any, ...]) -> StoredTreatment:
    id_, kind, performed_at, zones, note = row
    moment = datetime.fromisoformat(performed_at)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # times are stored in UTC
    return StoredTreatment(id_, kind, moment, tuple(json.loads(zones)), note)


def _record(row: tuple[Any, ...]) -> SessionRecord:
    (
        id_,
        routine_name,
        category,
        serial,
        kind,
        fmt,
        rate,
        started,
        ended,
        status,
        reason,
        summary,
        routine_text,
        program_id,
        device_program_from,
        _owner_pid,
    ) = row
    return SessionRecord(
        id_,
        routine_name,
        category,
        serial,
        kind,
        SampleFormat(fmt),
        rate,
        datetime.fromisoformat(started),
        datetime.fromisoformat(ended) if ended else None,
        status,
        reason,
        json.loads(summary),
        routine_text,
        program_id,
        device_program_from,
    )
