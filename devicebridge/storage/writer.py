"""The session stores' writer: telemetry and decisions of running sessions, committed
together every ``FLUSH_INTERVAL_S`` on one thread that writes every store of the process."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import numpy as np

from devicebridge.core.admission import PastSession
from devicebridge.core.engine import (
    Decision,
)
from devicebridge.errors import (
    SessionStoreError,
)
from devicebridge.storage.compactor import COMPACTOR
from devicebridge.storage.sessions import SampleChunk, SessionStore

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


# How long the store writer collects rows before it commits them (wall seconds). Fewer,
# larger commits cost the event loop less than one per batch; a killed bridge loses at
# most this much telemetry.
FLUSH_INTERVAL_S: Final = 0.25


# Compaction of finished sessions (CPU work in another process) waits for a pause of
# this long in the telemetry written, so that it does not compete with live devices for
# the machine: ``python -m bench latency`` at 100 devices (2 cores) gave a p99 of
# 0.73-1.65 ms (median 1.21) with no compaction while sessions streamed, 2.42-4.58 ms
# (median 3.51) with each session compacted in that process as it ended (five runs
# each), and 1.25-4.17 ms with each compacted on a thread of the bridge (wall seconds).
COMPACT_IDLE_S: Final = 2.0
# ... but no longer than this after a session ended (a bridge whose devices never pause
# still compacts, a minute's sessions at a time; wall seconds).
COMPACT_WAIT_S: Final = 60.0


# How much lower than the event loop's the OS priority of the writer's thread is (a nice
# increment, Linux only). With the device process, the loop and this thread on a few
# cores, the scheduler otherwise lets a commit run for a whole time slice
# while the loop's safety stop waits (``python -m bench latency``: the 100-device p99
# went from 4-15 ms to about 3 ms). It still gets every core the loop leaves idle.
BACKGROUND_NICE_INCREMENT: Final = 10
_MAX_NICE: Final = 19


# Wall seconds for the compaction's wait (a name of its own, so that tests can move it).
_now_s = time.monotonic


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _background_priority() -> None:
    """Run the calling thread below the event loop's OS priority, where the OS has
    per-thread priorities (Linux); elsewhere, or when refused, at the same priority.

    The writer keeps a share of a busy machine (not SCHED_IDLE, as the compactor's
    process has), so that what a killed bridge loses stays about ``FLUSH_INTERVAL_S`` of
    telemetry.
    """
    if sys.platform != "linux":
        return
    thread_id = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(
            os.PRIO_PROCESS, thread_id, min(_MAX_NICE, current + BACKGROUND_NICE_INCREMENT)
        )
    except OSError as exc:
        _LOGGER.debug("the store writer keeps the loop's priority: %s", exc)


class _WriterThread:
    """The one thread that writes every session store of this process.

    A bridge has one store; a QA run has one per simulated person. Fifty stores with a
    thread each took 2.4 times the CPU of one thread for the same commits (50 simulated
    massagers with a routine in virtual time: 1.6-1.8 s against 0.7 s outside the event
    loop's thread, over about 11 s), and every thread woken took the GIL from the loop.
    Jobs run one at a time in the order they were submitted, so each writer's jobs keep
    theirs; a long job of one store (a close that waits for its compactions) holds the
    others' commits back meanwhile, their rows waiting in memory. Started with its first
    writer, let go (without waiting) when the last one closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._writers = 0

    def join(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1,
                    thread_name_prefix="session-store",
                    initializer=_background_priority,
                )
            self._writers += 1
            return self._executor

    def leave(self) -> None:
        with self._lock:
            self._writers -= 1
            if self._writers == 0 and self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None

    def forget(self) -> None:
        """In a forked child: the parent's thread is not there (a writer starts another)."""
        self._lock = threading.Lock()
        self._executor = None
        self._writers = 0


_WRITER_THREAD: Final = _WriterThread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WRITER_THREAD.forget)


@dataclass(slots=True)
class _SampleRun:
    """Contiguous batches of one session waiting for the writer: one row once committed.

    A row per 100 ms batch made the writer thread hand the GIL back and forth with the
    event loop for every row (SQLite releases it around each statement step), which cost
    the loop more than the writing itself.
    """

    session_id: int
    first_sequence: int
    end_sequence: int
    parts: list[np.ndarray[Any, Any]]
    received_at: datetime

    def chunk(self) -> SampleChunk:
        parts = self.parts
        samples = (
            parts[0]
            if len(parts) == 1
            else np.frombuffer(b"".join(part.tobytes() for part in parts), dtype=parts[0].dtype)
        )
        return SampleChunk(self.session_id, self.first_sequence, samples, self.received_at)


class StoreWriter:
    """Groups the telemetry and decisions of every run on one store into one commit.

    Commits ``interval_s`` after the first row waiting, through a connection of its own
    on the process's writer thread (:class:`_WriterThread`), so neither the commits nor
    SQLite's checkpoints (fsync) hold up the event loop. :meth:`commit_session` writes what is left
    of one run at once, and a run waits for it before it stores its summary; a run waits
    for its own jobs with :func:`devicebridge.clock.result_off_loop`, which keeps the
    loop serving other devices on the wall clock and keeps a virtual-clock run
    deterministic.
    """

    def __init__(self, store: SessionStore, *, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.path = store.path
        self.interval_s = interval_s
        self.commits = 0  # of the thread (for tests and benchmarks)
        self._executor = _WRITER_THREAD.join()
        self._thread_store: SessionStore | None = None  # opened and used on the thread only
        self._closed: list[_SampleRun] = []  # runs a gap ended, waiting for the thread
        self._runs: dict[int, _SampleRun] = {}  # the open run of each session
        self._decisions: list[tuple[int, Sequence[Decision]]] = []
        self._in_flight: list[tuple[Future[None], frozenset[int]]] = []
        self._timer: asyncio.Handle | None = None
        # Sessions whose record is stored, to compact (appended where their job ended,
        # taken on the thread; a deque's append and popleft are atomic).
        self._finished: deque[int] = deque()
        self._compactions = 0  # finished since compactions were last waited for
        self._streamed_at_s = -math.inf  # (monotonic) the last write that held samples
        self._first_waiting_s: float | None = None  # (monotonic) since a compaction waits
        self._idle_check: asyncio.TimerHandle | None = None
        # Runs admitted on this store that have not ended, by run, with the id of the
        # session each has stored so far (None before it has): read and changed only by
        # jobs on the writer's thread, which runs them one at a time, so that an admission
        # there counts every run admitted before it (see RoutineRunner.admit).
        self.admitted_runs: dict[int, tuple[PastSession, int | None]] = {}
        self._closing = False

    def add_samples(
        self, session_id: int, first_sequence: int, samples: np.ndarray[Any, Any]
    ) -> None:
        count = int(samples.shape[0])
        run = self._runs.get(session_id)
        if run is not None and run.end_sequence == first_sequence:
            run.parts.append(samples)
            run.end_sequence += count
        else:
            if run is not None:
                self._closed.append(run)
            self._runs[session_id] = _SampleRun(
                session_id, first_sequence, first_sequence + count, [samples], _utc_now()
            )
        if self._timer is None:  # else _schedule() has nothing to do
            self._schedule()

    def add_decisions(self, session_id: int, decisions: Sequence[Decision]) -> None:
        self._decisions.append((session_id, tuple(decisions)))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._submit)

    def _submit(self) -> None:
        """Hand everything added so far to the thread (its jobs run in order)."""
        self._timer = None
        self._prune()
        runs, self._closed = self._closed, []
        runs += self._runs.values()
        self._runs.clear()
        decisions, self._decisions = self._decisions, []
        if not runs and not decisions:
            return
        if runs:
            self._streamed_at_s = _now_s()
        sessions = frozenset(run.session_id for run in runs) | {d[0] for d in decisions}
        job = self._executor.submit(self._write, runs, decisions)
        self._in_flight.append((job, sessions))

    def _write(
        self, runs: list[_SampleRun], decisions: list[tuple[int, Sequence[Decision]]]
    ) -> None:
        # The runs' batches are joined here, not on the event loop (a quarter second of
        # every device's telemetry took the loop about half a millisecond).
        self._store_of_thread().append_many([run.chunk() for run in runs], decisions)
        self.commits += 1

    def _store_of_thread(self) -> SessionStore:
        if self._thread_store is None:
            self._thread_store = SessionStore(self.path)
        return self._thread_store

    def submit(self, operation: Callable[[SessionStore], T]) -> Future[T]:
        """``operation`` on the writer's connection, after the writes before it.

        A run's own writes go this way too, so the two connections never wait for each
        other's lock (SQLite's busy wait sleeps in steps of milliseconds). A run on the
        event loop waits for it with :func:`devicebridge.clock.result_off_loop`.
        """
        self._prune()
        return self._executor.submit(lambda: operation(self._store_of_thread()))

    def admitted_run_ended(self, run_key: int) -> None:
        """Run ``run_key`` no longer counts as admitted (:attr:`admitted_runs`), once the
        jobs before this one are done: its stored session, if any, counts from then on."""
        if not self._closing:
            self._executor.submit(self.admitted_runs.pop, run_key, None)

    def run_now(self, operation: Callable[[SessionStore], T]) -> T:
        """:meth:`submit`, waiting for the result (blocks)."""
        return self.submit(operation).result()

    def _prune(self) -> None:
        still: list[tuple[Future[None], frozenset[int]]] = []
        for job, sessions in self._in_flight:
            if not job.done():
                still.append((job, sessions))
            elif job.exception() is not None:
                _LOGGER.error(
                    "%s: telemetry of sessions %s not stored: %s",
                    self.path,
                    sorted(sessions),
                    job.exception(),
                )
        self._in_flight = still

    def commit_session(self, session_id: int) -> Future[None]:
        """Everything of session ``session_id`` committed once the returned job is done.

        Its rows still waiting are written after the thread's earlier writes (decisions
        keep their order). The job raises :class:`SessionStoreError` if any of its rows
        could not be stored.
        """
        runs = [run for run in self._closed if run.session_id == session_id]
        run = self._runs.pop(session_id, None)
        if run is not None:
            runs.append(run)
        decisions = [d for d in self._decisions if d[0] == session_id]
        self._closed = [run for run in self._closed if run.session_id != session_id]
        self._decisions = [d for d in self._decisions if d[0] != session_id]
        earlier = [job for job, sessions in self._in_flight if session_id in sessions]

        def commit(thread_store: SessionStore) -> None:
            # The thread runs its jobs in order: the earlier writes are done by now.
            failure = next((e for e in (j.exception() for j in earlier) if e is not None), None)
            if failure is not None:
                raise SessionStoreError(f"telemetry not stored: {failure}", path=self.path)
            thread_store.append_many([run.chunk() for run in runs], decisions)

        return self.submit(commit)

    def finish_session(self, session_id: int, **record: Any) -> Future[None]:
        """:meth:`SessionStore.finish_session` on the writer's connection; the session's
        telemetry is compacted later, in the compactor's process
        (:mod:`devicebridge.storage.compactor`), once no telemetry has been written for
        ``COMPACT_IDLE_S`` (at most ``COMPACT_WAIT_S`` after it ended), or when the
        writer closes."""
        job = self.submit(lambda store: store.finish_session(session_id, **record))
        job.add_done_callback(functools.partial(self._finished_stored, session_id))
        self._compactions += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop, so no telemetry streams: now
            self._executor.submit(self._compact_finished)
            return job
        if self._first_waiting_s is None:
            self._first_waiting_s = _now_s()
        if self._idle_check is None:
            self._idle_check = loop.call_later(COMPACT_IDLE_S, self._compact_when_idle)
        return job

    def _finished_stored(self, session_id: int, finished: Future[None]) -> None:
        # On the writer's thread (or here, if it was done already): it may be compacted.
        if not finished.cancelled() and finished.exception() is None:
            self._finished.append(session_id)

    def _compact_when_idle(self) -> None:
        """Hand the finished sessions to the compactor once telemetry has paused, or
        once the first of them has waited long enough; else look again later."""
        self._idle_check = None
        now_s = _now_s()
        waited_s = 0.0 if self._first_waiting_s is None else now_s - self._first_waiting_s
        idle_s = now_s - self._streamed_at_s
        if idle_s >= COMPACT_IDLE_S or waited_s >= COMPACT_WAIT_S:
            self._first_waiting_s = None
            self._executor.submit(self._compact_finished)
        else:
            delay_s = min(COMPACT_IDLE_S - idle_s, COMPACT_WAIT_S - waited_s)
            self._idle_check = asyncio.get_running_loop().call_later(
                delay_s, self._compact_when_idle
            )

    def _compact_finished(self) -> None:
        """On the writer's thread, after the jobs before it: every session finished so
        far to the compactor."""
        finished = []
        with contextlib.suppress(IndexError):
            while True:
                finished.append(self._finished.popleft())
        if finished:
            COMPACTOR.compact(self.path, finished)

    def wait_compacted(self) -> None:
        """Every session finished so far compacted (for tests and benchmarks; blocks)."""
        self._compacted_after_writes().result()

    def _compacted_after_writes(self) -> Future[None]:
        """On the thread, after the jobs queued so far: every finished session to the
        compactor, then until it has compacted them."""
        self._compactions = 0
        self._executor.submit(self._compact_finished)
        return self._executor.submit(COMPACTOR.sync)

    def close(self) -> None:
        """Hand the last write and the store's closing to the writer thread, without
        waiting for them (the thread stops once no writer of the process uses it), unless
        sessions finished on it since compactions were last waited for: then wait
        until they are compacted, so that nothing opens the file once the writer's owner
        closed it (a run's compaction takes a fraction of a second)."""
        if self._closing:
            return
        self._closing = True
        for handle in (self._timer, self._idle_check):
            if handle is not None:
                handle.cancel()
        self._idle_check = None
        self._submit()
        synced = self._compacted_after_writes() if self._compactions else None
        self._executor.submit(self._close_store)
        _WRITER_THREAD.leave()
        if synced is not None:
            synced.result()

    def _close_store(self) -> None:
        if self._thread_store is not None:
            self._thread_store.close()
            self._thread_store = None
