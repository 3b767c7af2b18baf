"""How every store of devicebridge opens its SQLite file.

- ``isolation_level=None``: each store issues BEGIN/COMMIT itself, so one operation is
  exactly one transaction;
- WAL journal: readers (``devicebridge history`` in one terminal) never block the writer
  (``serve`` or ``run`` in another);
- ``synchronous = NORMAL`` in WAL mode: a committed transaction survives a killed process
  (it is in the WAL file); only an OS crash or power cut may lose the last commits;
- foreign keys on; a busy timeout so that two processes wait for each other briefly
  rather than failing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

BUSY_TIMEOUT_S: Final = 5.0


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating its folder) and configure one store; raises OSError or sqlite3.Error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error:
        db.close()
        raise
    return db
