"""Trusted therapist keys, received programs, used nonces and installations (SQLite).

Nonces are kept for as long as the program they came with could still be valid, so a
replayed program is refused even after a restart; a program is stored before it is
acknowledged, so an ``accepted`` answer is never given for something the bridge could
lose. Each trusted key is bound to one therapist id (a key cannot be re-bound without
removing it first).

Every time is stored as an instant in UTC, written with microseconds
(``2026-11-23T12:00:00.000000+00:00``): one fixed width, so that comparing the text in
SQL compares the instants. Databases of the first release (schema 0), which kept
whatever UTC offset a signer wrote, are rewritten when opened.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from devicebridge.errors import KeyBoundError, ProgramStoreError
from devicebridge.storage.sqlite import connect

PROGRAMS_FILENAME: Final = "programs.sqlite3"
SCHEMA_VERSION: Final = 1
# Nonces are pruned only this long after their program expired: a bridge whose clock is
# set back (by hand or by a bad time server) still refuses the replay.
NONCE_GRACE: Final = timedelta(days=1)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS trusted_keys (
    key_id       TEXT PRIMARY KEY,
    therapist_id TEXT NOT NULL,
    public_key   TEXT NOT NULL,
    added_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS used_nonces (
    nonce      TEXT PRIMARY KEY,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS programs (
    id              INTEGER PRIMARY KEY,
    therapist_id    TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    program_version TEXT NOT NULL,
    routine_name    TEXT NOT NULL,
    device_kind     TEXT NOT NULL,
    program_text    TEXT NOT NULL,
    nonce           TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    expires_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS installations (
    program_id    INTEGER NOT NULL REFERENCES programs (id),
    device_serial TEXT NOT NULL,
    installed_at  TEXT NOT NULL,
    PRIMARY KEY (program_id, device_serial)
);
"""
# (table, key column, time columns): what the schema-0 migration rewrites.
_TIME_COLUMNS: Final = (
    ("trusted_keys", "key_id", ("added_at",)),
    ("used_nonces", "nonce", ("expires_at",)),
    ("programs", "id", ("received_at", "expires_at")),
    ("installations", "rowid", ("installed_at",)),
)


def utc_text(moment: datetime) -> str:
    """``moment`` as stored: the instant in UTC, fixed width (text order = time order)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment!r} has no time zone: cannot tell which instant it is")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key_id: str
    therapist_id: str
    public_key: str  # base64 of the raw 32 bytes
    added_at: datetime


@dataclass(frozen=True, slots=True)
class StoredProgram:
    id: int
    therapist_id: str
    key_id: str
    program_version: str
    routine_name: str
    device_kind: str
    program_text: str
    received_at: datetime
    expires_at: datetime
    installed_on: tuple[str, ...]
    nonce: str = ""  # the envelope's, which the therapist's acknowledgement carried


class ProgramStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise ProgramStoreError(f"cannot open the program store: {exc}", path=path) from exc
        try:
            # An acknowledged program and its burnt nonce survive a power cut too: a lost
            # nonce would let the same envelope be accepted again.
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise ProgramStoreError(f"cannot open the program store: {exc}", path=path) from exc
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise ProgramStoreError(
                    f"written by a newer devicebridge (schema {version}, this one reads"
                    f" {SCHEMA_VERSION})",
                    path=self.path,
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._normalise_times()
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _normalise_times(self) -> None:
        """Schema 0 kept the offset the signer wrote; rewrite every time in UTC."""
        for table, key, columns in _TIME_COLUMNS:
            rows = self._db.execute(f"SELECT {key}, {', '.join(columns)} FROM {table}")
            for row_key, *texts in rows.fetchall():
                values = [utc_text(_stored_time(text, self.path)) for text in texts]
                assignments = ", ".join(f"{column} = ?" for column in columns)
                self._db.execute(
                    f"UPDATE {table} SET {assignments} WHERE {key} = ?", (*values, row_key)
                )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ trust
    def trust(self, key_id: str, therapist_id: str, public_key: str) -> None:
        """Trust ``public_key`` for ``therapist_id``; raise :class:`KeyBoundError` if the
        key is already trusted for another therapist. Trusting it again for the same one
        changes nothing."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT therapist_id, public_key FROM trusted_keys WHERE key_id = ?",
                    (key_id,),
                ).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO trusted_keys VALUES (?, ?, ?, ?)",
                        (key_id, therapist_id, public_key, utc_text(datetime.now(UTC))),
                    )
                elif row[0] != therapist_id:
                    raise KeyBoundError(
                        key_id, therapist_id=row[0], wanted=therapist_id, path=self.path
                    )
                elif row[1] != public_key:
                    raise ProgramStoreError(
                        f"key id {key_id} is already used by another public key", path=self.path
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise ProgramStoreError(str(exc), path=self.path) from exc

    def distrust(self, key_id: str) -> bool:
        return self._db.execute("DELETE FROM trusted_keys WHERE key_id = ?", (key_id,)).rowcount > 0

    def trusted_keys(self) -> list[TrustedKey]:
        rows = self._db.execute("SELECT * FROM trusted_keys ORDER BY added_at, key_id").fetchall()
        return [TrustedKey(k, t, p, datetime.fromisoformat(a)) for k, t, p, a in rows]

    def trusted_key(self, key_id: str) -> TrustedKey | None:
        try:
            row = self._db.execute(
                "SELECT * FROM trusted_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise ProgramStoreError(str(exc), path=self.path) from exc
        if row is None:
            return None
        kid, therapist, public, added = row
        return TrustedKey(kid, therapist, public, datetime.fromisoformat(added))

    # ------------------------------------------------------------------ nonces and programs
    def nonce_seen(self, nonce: str) -> bool:
        try:
            row = self._db.execute("SELECT 1 FROM used_nonces WHERE nonce = ?", (nonce,))
            return row.fetchone() is not None
        except sqlite3.Error as exc:
            raise ProgramStoreError(str(exc), path=self.path) from exc

    def accept(
        self,
        *,
        therapist_id: str,
        key_id: str,
        program_version: str,
        routine_name: str,
        device_kind: str,
        program_text: str,
        nonce: str,
        expires_at: datetime,
        now: datetime | None = None,
    ) -> int:
        """Store an accepted program and burn its nonce, in one transaction.

        Nonces of programs expired (by ``now``, default the system clock) for longer than
        :data:`NONCE_GRACE` are pruned on the way.
        """
        received = now if now is not None else datetime.now(UTC)
        expires_text, received_text = utc_text(expires_at), utc_text(received)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "DELETE FROM used_nonces WHERE expires_at < ?",
                (utc_text(received - NONCE_GRACE),),
            )
            self._db.execute("INSERT INTO used_nonces VALUES (?, ?)", (nonce, expires_text))
            cursor = self._db.execute(
                "INSERT INTO programs (therapist_id, key_id, program_version, routine_name,"
                " device_kind, program_text, nonce, received_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    therapist_id,
                    key_id,
                    program_version,
                    routine_name,
                    device_kind,
                    program_text,
                    nonce,
                    received_text,
                    expires_text,
                ),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise ProgramStoreError(str(exc), path=self.path) from exc
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def mark_installed(self, program_id: int, device_serial: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO installations VALUES (?, ?, ?)",
            (program_id, device_serial, utc_text(datetime.now(UTC))),
        )

    def programs(self) -> list[StoredProgram]:
        rows = self._db.execute(
            "SELECT id, therapist_id, key_id, program_version, routine_name, device_kind,"
            " program_text, received_at, expires_at, nonce FROM programs ORDER BY id"
        ).fetchall()
        result = []
        for pid, therapist, kid, version, name, kind, text, received, expires, nonce in rows:
            devices = tuple(
                serial
                for (serial,) in self._db.execute(
                    "SELECT device_serial FROM installations WHERE program_id = ?", (pid,)
                )
            )
            result.append(
                StoredProgram(
                    pid,
                    therapist,
                    kid,
                    version,
                    name,
                    kind,
                    text,
                    datetime.fromisoformat(received),
                    datetime.fromisoformat(expires),
                    devices,
                    nonce,
                )
            )
        return result

    def pending_for(
        self, device_kind: str, device_serial: str, *, now: datetime | None = None
    ) -> list[StoredProgram]:
        """Valid programs for this kind of device not yet installed on it, oldest first."""
        moment = now if now is not None else datetime.now(UTC)
        return [
            p
            for p in self.programs()
            if p.device_kind == device_kind
            and device_serial not in p.installed_on
            and p.expires_at > moment
        ]


def _stored_time(text: str, path: Path) -> datetime:
    """A time as the first release stored it (ISO 8601, any offset; naive taken as UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ProgramStoreError(
            f"unreadable time {text!r} in the program store", path=path
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
