"""Trusted therapist keys, received programs, used nonces and installations (SQLite).

Nonces are kept for as long as the program they came with could still be valid, so a
replayed program is refused even after a restart; a program is stored before it is
acknowledged, so an ``accepted`` answer is never given for something the bridge could
lose.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from devicebridge.errors import DeviceBridgeError
from devicebridge.storage.files import prepare_database, tighten_database

PROGRAMS_FILENAME: Final = "programs.sqlite3"
BUSY_TIMEOUT_S: Final = 5.0

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


class ProgramStoreError(DeviceBridgeError):
    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


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


class ProgramStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            prepare_database(path)  # health data: a 0700 folder, a 0600 file
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.executescript(_SCHEMA)
            tighten_database(path)  # -wal and -shm too, also when left wider
        except (OSError, sqlite3.Error) as exc:
            raise ProgramStoreError(f"cannot open the program store: {exc}", path=path) from exc

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ trust
    def trust(self, key_id: str, therapist_id: str, public_key: str) -> None:
        self._db.execute(
            "INSERT INTO trusted_keys VALUES (?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE"
            " SET therapist_id = excluded.therapist_id",
            (key_id, therapist_id, public_key, datetime.now(UTC).isoformat()),
        )

    def distrust(self, key_id: str) -> bool:
        return self._db.execute("DELETE FROM trusted_keys WHERE key_id = ?", (key_id,)).rowcount > 0

    def trusted_keys(self) -> list[TrustedKey]:
        rows = self._db.execute("SELECT * FROM trusted_keys ORDER BY added_at").fetchall()
        return [TrustedKey(k, t, p, datetime.fromisoformat(a)) for k, t, p, a in rows]

    # ------------------------------------------------------------------ nonces and programs
    def nonce_seen(self, nonce: str) -> bool:
        row = self._db.execute("SELECT 1 FROM used_nonces WHERE nonce = ?", (nonce,)).fetchone()
        return row is not None

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
    ) -> int:
        """Store an accepted program and burn its nonce, in one transaction."""
        now = datetime.now(UTC)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM used_nonces WHERE expires_at < ?", (now.isoformat(),))
            self._db.execute(
                "INSERT INTO used_nonces VALUES (?, ?)", (nonce, expires_at.isoformat())
            )
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
                    now.isoformat(),
                    expires_at.isoformat(),
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
            (program_id, device_serial, datetime.now(UTC).isoformat()),
        )

    def programs(self) -> list[StoredProgram]:
        rows = self._db.execute(
            "SELECT id, therapist_id, key_id, program_version, routine_name, device_kind,"
            " program_text, received_at, expires_at FROM programs ORDER BY id"
        ).fetchall()
        result = []
        for pid, therapist, kid, version, name, kind, text, received, expires in rows:
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
                )
            )
        return result

    def pending_for(self, device_kind: str, device_serial: str) -> list[StoredProgram]:
        """Valid programs for this kind of device not yet installed on it, oldest first."""
        now = datetime.now(UTC)
        return [
            p
            for p in self.programs()
            if p.device_kind == device_kind
            and device_serial not in p.installed_on
            and p.expires_at > now
        ]
