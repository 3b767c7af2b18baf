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
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from devicebridge.storage.files import prepare_database, tighten_database

BUSY_TIMEOUT_S: Final = 5.0


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating its folder) and configure one store; raises OSError or sqlite3.Error."""
    prepare_database(path)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
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
