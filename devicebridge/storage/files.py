"""Private files: what the bridge keeps is health data (sessions, treatments) and keys.

The data directory is 0700 and every file the bridge creates in it 0600 (the SQLite
databases with their ``-wal`` and ``-shm`` files, the status file, the lock file), whatever
the umask. A file is created with its private mode from the start, so it is never readable
by others, not even briefly; an existing installation with wider modes is tightened when a
store, the status file or the lock opens it. A file or folder the user does not own (so
cannot chmod) is logged and left as it is.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

_LOGGER = logging.getLogger(__name__)

PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600
# SQLite creates these next to a database (WAL mode: -wal and -shm; rollback: -journal),
# with the database file's own mode.
SQLITE_COMPANION_SUFFIXES: Final = ("-wal", "-shm", "-journal")


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700; raises OSError."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    make_private(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 unless it exists, then make it 0600.

    Creates its folder as :func:`private_directory`; raises OSError. An existing file is
    never opened here: closing any descriptor of an SQLite database drops every POSIX lock
    this process holds on it (fcntl semantics), under the feet of an open connection.
    """
    private_directory(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    make_private(path, PRIVATE_FILE_MODE)
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600 for a file that may be created; returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        _narrow_fd(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare_database(path: Path) -> None:
    """Before SQLite opens ``path``: a 0700 folder and a 0600 file (SQLite gives its -wal
    and -shm files the database file's mode)."""
    private_file(path)


def tighten_database(path: Path) -> None:
    """After SQLite opened ``path``: the database and its companion files 0600."""
    for candidate in (path, *(path.with_name(path.name + s) for s in SQLITE_COMPANION_SUFFIXES)):
        make_private(candidate, PRIVATE_FILE_MODE)


def make_private(path: Path, mode: int) -> None:
    """Give ``path`` exactly ``mode`` if it exists with another one."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current == mode:
        return
    try:
        os.chmod(path, mode)
    except PermissionError as exc:
        _LOGGER.warning("%s: cannot make it private (mode %o): %s", path, current, exc.strerror)


def _narrow_fd(fd: int, path: Path) -> None:
    current = stat.S_IMODE(os.fstat(fd).st_mode)
    if current != PRIVATE_FILE_MODE:
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        except PermissionError as exc:
            _LOGGER.warning("%s: cannot make it private (mode %o): %s", path, current, exc.strerror)
