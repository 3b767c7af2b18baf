"""Compaction of ended sessions' telemetry, in a process of its own.

Compacting a session (:meth:`SessionStore.compact_telemetry`: read its raw chunks,
delta-code and deflate them, swap them in one transaction) is Python and numpy work that
holds the GIL for most of its time. On a thread of the bridge's process it took the GIL
from the event loop whenever a session ended, and at a low OS priority it kept it while
the OS ran other processes, so a safety stop waited behind it (``python -m bench
latency``, 100 devices: a p99 of 2.6-4.2 ms with that thread, 1.4-1.9 ms without any
compaction, three paired runs). A thread of the bridge that only relayed the answers of
another process did the same, so nothing of the bridge waits for them.

One child process per bridge process (``python -m devicebridge.storage.compactor``)
compacts, at the lowest OS priority (SCHED_IDLE on Linux: only on a core nothing else
wants). It starts with the store writer's process (``start_store_writer``), or else when
the first sessions are handed to it (the store writer waits for a pause in the telemetry
first), and loads what a compaction uses before its first job. It reads one line per job
on its stdin:
``{"compact": [path, [session_id, ...]]}`` (it opens the store for the job and closes it
after, and logs what it could not compact: those sessions' raw chunks stay, and read the
same) or ``{"sync": token}``, which it answers on its stdout once every job before it is
done. It ends when its stdin closes: when the bridge exits, or is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

from devicebridge.storage.children import lowest_priority, start_helper

_LOGGER = logging.getLogger(__name__)

# How long a sync (a writer closing, the exit of this process) waits for the compactor.
SYNC_WAIT_S: Final = 30.0
# Sessions per job line: a line stays a few kilobytes, under Linux's PIPE_BUF (4096
# bytes), so that it is written whole or refused whole there (elsewhere a line begun is
# finished: see _Child.send).
SESSIONS_PER_JOB: Final = 200


class _Child:
    """One compactor process."""

    def __init__(self) -> None:
        self.process = start_helper("devicebridge.storage.compactor")
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.jobs = self.process.stdin.fileno()
        self.answers = self.process.stdout
        # Where pipes can be polled (POSIX), a full pipe refuses a job rather than block
        # the event loop; elsewhere a write waits for room.
        self.pollable = os.name == "posix"
        if self.pollable:
            os.set_blocking(self.jobs, False)
        self.syncs = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, line: bytes, *, wait_s: float = 0.0) -> None:
        """Write one job line. Raises BlockingIOError if the pipe stays full ``wait_s``
        before any of it went (nothing was sent), OSError if the child is gone."""
        deadline_s = time.monotonic() + wait_s
        left = memoryview(line)
        while left:
            try:
                left = left[os.write(self.jobs, left) :]
                continue
            except BlockingIOError:
                if len(left) == len(line):
                    wait = deadline_s - time.monotonic()
                    if wait <= 0:
                        raise
                else:  # half a line went: the rest must follow, or the child goes
                    wait = SYNC_WAIT_S
            if not select.select([], [self.jobs], [], wait)[1] and len(left) < len(line):
                self.process.kill()
                raise BrokenPipeError("the compactor stopped reading half-way through a job")

    def close(self) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(SYNC_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.answers.close()


class Compactor:
    """The bridge's side: jobs handed to the child process, started when needed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._exit_hook = False

    def compact(self, path: Path, session_ids: Sequence[int]) -> None:
        """Queue the compaction of sessions ``session_ids`` of the store at ``path``.

        Never waits: with the child gone, or its queue full (thousands of sessions
        behind), the sessions keep their raw chunks (logged).
        """
        with self._lock:
            for start in range(0, len(session_ids), SESSIONS_PER_JOB):
                chunk = [
                    int(session_id) for session_id in session_ids[start : start + SESSIONS_PER_JOB]
                ]
                line = (json.dumps({"compact": [str(path), chunk]}) + "\n").encode()
                try:
                    self._running().send(line)
                except OSError as exc:
                    _LOGGER.error("sessions %s: telemetry not compacted: %s", chunk, exc)

    def start_soon(self) -> None:
        """Start the child now, if it does not run, so that it is ready for the first job
        (it takes a tenth of a second to start; it does not wait for it)."""
        with self._lock:
            self._running()

    def sync(self) -> None:
        """Wait until every compaction queued before this call is done."""
        with self._lock:
            child = self._child
            if child is None or not child.alive():
                return
            child.syncs += 1
            token = child.syncs
            try:
                child.send((json.dumps({"sync": token}) + "\n").encode(), wait_s=SYNC_WAIT_S)
                while True:
                    ready = (
                        not child.pollable or select.select([child.answers], [], [], SYNC_WAIT_S)[0]
                    )
                    raw = child.answers.readline() if ready else b""
                    if not raw:
                        _LOGGER.warning(
                            "the compactor ended, or did not answer within %g s", SYNC_WAIT_S
                        )
                        return
                    if json.loads(raw).get("synced") == token:
                        return
            except (OSError, ValueError) as exc:
                _LOGGER.warning("the compactor did not answer: %s", exc)

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs (for tests)."""
        child = self._child
        return child.process.pid if child is not None and child.alive() else None

    def close(self) -> None:
        """End the child once it has done every job (at this process's exit)."""
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.close()

    def _running(self) -> _Child:
        child = self._child
        if child is None or not child.alive():
            if child is not None:
                child.close()
            child = self._child = _Child()
            if not self._exit_hook:
                atexit.register(self.close)
                self._exit_hook = True
        return child


COMPACTOR: Final = Compactor()

# What a compaction uses (SessionStore.compact_telemetry: the store, the sample formats,
# numpy), loaded by the child as it starts.
_JOB_MODULES: Final = ("devicebridge.storage.sessions", "protocols.telemetry", "numpy")


# --------------------------------------------------------------------------- the child


def _compact(path: Path, session_ids: Sequence[int]) -> None:
    from devicebridge.errors import SessionStoreError
    from devicebridge.storage.sessions import SessionStore

    if not path.is_file():  # never create a store that went away
        _LOGGER.error("sessions %s: telemetry not compacted: %s is gone", list(session_ids), path)
        return
    try:
        with SessionStore(path) as store:
            for session_id in session_ids:
                try:
                    store.compact_telemetry(session_id)
                except SessionStoreError as exc:
                    # Its raw chunks stay: they read the same, only larger.
                    _LOGGER.error("session %d: telemetry not compacted: %s", session_id, exc)
    except SessionStoreError as exc:
        _LOGGER.error("sessions %s: telemetry not compacted: %s", list(session_ids), exc)


def serve(jobs: IO[bytes], answers: IO[bytes]) -> None:
    """Do every job of ``jobs``, in order, until ``jobs`` ends; answer syncs."""
    for line in jobs:
        try:
            job = json.loads(line)
            if "sync" in job:
                answers.write((json.dumps({"synced": job["sync"]}) + "\n").encode())
                answers.flush()
                continue
            path, session_ids = job["compact"]
            _compact(Path(path), [int(session_id) for session_id in session_ids])
        except (ValueError, KeyError, TypeError) as exc:
            _LOGGER.error("the compactor skipped a job it cannot read (%s): %r", exc, line)


if __name__ == "__main__":
    logging.basicConfig(format="devicebridge compactor: %(message)s", level=logging.WARNING)
    lowest_priority()
    # What every job reads and writes, loaded before the first one comes (the child is
    # started ahead: the job that waits for it, at a run's end, does not wait for this).
    # The store loads numpy and the sample formats only when telemetry is read, and numpy
    # alone takes a tenth of a second or more to load: a 15-minute run on the virtual
    # clock waited 84-130 ms for its one compaction (15-25 ms of work) at its end.
    for module in _JOB_MODULES:
        importlib.import_module(module)
    serve(sys.stdin.buffer, sys.stdout.buffer)
