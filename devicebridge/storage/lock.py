"""One bridge per data directory: the lock that ``devicebridge serve`` holds while it runs.

``serve`` takes an exclusive ``flock(2)`` on ``<data dir>/bridge.lock`` before it opens any
store and holds it until it exits. The kernel releases the lock when the process ends in
any way (a clean stop, SIGKILL, a crash), so a stale lock never blocks the next start. A
second ``serve`` on the same data directory is refused at once with
:class:`BridgeRunningError`, which names the running pid. :func:`holder` says whether a
bridge runs from the lock itself, never from a pid alone (a pid is reused after its
process died).

While locked the file holds the holder's pid (decimal, one line); a clean release empties
it. The file is never deleted: deleting a lock file lets two processes lock two different
files of the same name. Use::

    with acquire(data_dir) as lock:   # BridgeRunningError if a bridge runs already
        ...                           # lock.pid == os.getpid()
    holder(data_dir)                  # the running bridge's pid, or None
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from devicebridge.errors import BridgeLockError, BridgeRunningError
from devicebridge.storage.files import open_private, private_directory

LOCK_FILENAME: Final = "bridge.lock"
# The holder writes its pid right after it got the lock, and `holder` takes a shared lock
# for an instant to look: either can catch the other in that window, so a few quick retries
# tell a moment's overlap from a real holder.
LOCK_ATTEMPTS: Final = 50
LOCK_RETRY_PAUSE_S: Final = 0.01
MAX_PID_FILE_BYTES: Final = 64


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_FILENAME


class BridgeLock:
    """A held lock (from :func:`acquire`); :meth:`release` is idempotent."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.pid = os.getpid()
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no pid left behind for a reader to trust
        except OSError:
            pass  # the lock still goes with the descriptor
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


def try_acquire(data_dir: Path) -> BridgeLock:
    """Take the lock of ``data_dir`` now or raise :class:`BridgeRunningError`."""
    path = lock_path(data_dir)
    try:
        private_directory(data_dir)
        fd = open_private(path, os.O_RDWR)
    except OSError as exc:
        message = f"{path}: cannot open the lock file: {exc.strerror}"
        raise BridgeLockError(message, path=path) from exc
    try:
        for _ in range(LOCK_ATTEMPTS):
            if _try_lock(fd, fcntl.LOCK_EX, path):
                _write_pid(fd, path)
                return BridgeLock(path, fd)
            pid = _read_pid(fd)
            if pid is not None:
                raise BridgeRunningError(pid, path=path)
            time.sleep(LOCK_RETRY_PAUSE_S)  # a reader's instant, or a holder's first write
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise BridgeLockError(f"{path}: locked by a process that wrote no pid", path=path)


@contextmanager
def acquire(data_dir: Path) -> Iterator[BridgeLock]:
    """Hold the lock of ``data_dir`` for the ``with`` block (see :func:`try_acquire`)."""
    lock = try_acquire(data_dir)
    try:
        yield lock
    finally:
        lock.release()


def holder(data_dir: Path) -> int | None:
    """The pid of the bridge holding ``data_dir``'s lock, or ``None`` when none does."""
    path = lock_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        message = f"{path}: cannot read the lock file: {exc.strerror}"
        raise BridgeLockError(message, path=path) from exc
    try:
        for _ in range(LOCK_ATTEMPTS):
            if _try_lock(fd, fcntl.LOCK_SH, path):
                return None  # nobody holds it (closing the descriptor lets go again)
            pid = _read_pid(fd)
            if pid is not None:
                return pid
            time.sleep(LOCK_RETRY_PAUSE_S)  # the holder has not written its pid yet
    finally:
        os.close(fd)
    raise BridgeLockError(f"{path}: locked by a process that wrote no pid", path=path)


def _try_lock(fd: int, operation: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise BridgeLockError(f"{path}: cannot lock: {exc.strerror}", path=path) from exc
    return True


def _write_pid(fd: int, path: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        raise BridgeLockError(f"{path}: cannot write the pid: {exc.strerror}", path=path) from exc


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, MAX_PID_FILE_BYTES, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


# --------------------------------------------------------------------------- session owners

OWNERS_DIRNAME: Final = "owners"
_marks: dict[Path, int] = {}  # data directories this process marked itself alive in
# The same, as absolute paths given: every session's start marks its store's directory, and
# resolving it again took a system call per path component, on the writer's thread of the time
# that committed every device's telemetry.
_marked_as_given: set[Path] = set()


def mark_process_alive(data_dir: Path) -> None:
    """This process runs sessions of ``data_dir``: say so for as long as it lives.

    A lock on ``owners/<pid>.lock`` in the data directory, held until the process ends
    (released by the kernel however it ends). :func:`process_alive` reads it, so that a
    command recovering the sessions a killed process left ``running`` never takes those of
    another process still running them (two ``run`` commands on two devices at once).
    Idempotent.
    """
    if data_dir in _marked_as_given:
        return
    folder = data_dir.resolve() / OWNERS_DIRNAME
    if folder in _marks:
        _remember_as_given(data_dir)
        return
    private_directory(folder)
    path = folder / f"{os.getpid()}.lock"
    while True:
        fd = open_private(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a reader checking a dead namesake holds it briefly
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            _marks[folder] = fd  # kept open: the lock lives as long as the process
            _remember_as_given(data_dir)
            return
        os.close(fd)  # that reader removed the file meanwhile: lock the new one


def _remember_as_given(data_dir: Path) -> None:
    if data_dir.is_absolute():  # a relative one may name another folder after a chdir
        _marked_as_given.add(data_dir)


def process_alive(data_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` still runs sessions of ``data_dir`` (see
    :func:`mark_process_alive`); a dead owner's mark is removed."""
    if pid == os.getpid():
        return True
    path = data_dir.resolve() / OWNERS_DIRNAME / f"{pid}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        if not _try_lock(fd, fcntl.LOCK_EX, path):
            return True
        path.unlink(missing_ok=True)  # removed while locked: nobody can lock this one again
        return False
    finally:
        os.close(fd)
