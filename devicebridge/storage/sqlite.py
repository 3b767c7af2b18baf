"""How every store of devicebridge opens its SQLite file.

- ``isolation_level=None``: each store issues BEGIN/COMMIT itself, so one operation is
  exactly one transaction;
- WAL journal: readers (``devicebridge history`` in one terminal) never block the writer
  (``serve`` or ``run`` in another);
- ``synchronous = NORMAL`` in WAL mode: a committed transaction survives a killed process
  (it is in the WAL file); only an OS crash or power cut may lose the last commits;
- foreign keys on; a busy timeout so that two processes wait for each other briefly
  rather than failing;
- private: the folder 0700, the database and its -wal and -shm files 0600
  (:mod:`devicebridge.storage.files`), also for a database an older version left wider.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from devicebridge.storage.files import prepare_database, tighten_database

BUSY_TIMEOUT_S: Final = 5.0
# Between two tries at switching a new store to WAL while another process opens it too.
WAL_RETRY_S: Final = 0.01


def _journal_in_wal(db: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, tried again for up to ``BUSY_TIMEOUT_S`` while another
    connection holds the lock it needs: SQLite answers that switch "database is locked" at
    once, without its busy timeout (two ``devicebridge run`` on one new data directory
    failed so, 3-5 times in 30 races of four processes)."""
    deadline_s = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            )
            if not busy or time.monotonic() >= deadline_s:
                raise
        time.sleep(WAL_RETRY_S)


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating its folder) and configure one store; raises OSError or sqlite3.Error."""
    prepare_database(path)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        _journal_in_wal(db)
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        tighten_database(path)
    except (OSError, sqlite3.Error):
        db.close()
        raise
    return db


def migrate(db: sqlite3.Connection, migrations: Sequence[str]) -> int | None:
    """Bring a store's schema (``PRAGMA user_version``) up to ``len(migrations)``.

    Each migration runs in a transaction of its own, with the version read again inside
    it: two processes opening a new store at once (two commands on one data directory)
    do not both run it. Returns the version found when it is newer than this code knows
    (nothing is changed then), else None.
    """
    known = len(migrations)
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version == known:
        return None
    for target in range(known):
        db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > known:
                db.execute("ROLLBACK")
                return int(version)
            if version <= target:
                for statement in migrations[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                # PRAGMA takes no parameters; the version is our own int.
                db.execute(f"PRAGMA user_version = {target + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return None
