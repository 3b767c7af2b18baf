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
