"""The session stores' writer: telemetry and decisions of running sessions, committed
together every ``FLUSH_INTERVAL_S`` by one process that writes every store of the bridge's
process (``python -m devicebridge.storage.writer_process``), so that the stores' work never
holds the event loop's GIL."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import functools
import io
import itertools
import logging
import math
import os
import pickle
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np

from devicebridge.core.engine import Decision
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import Routine
from devicebridge.errors import SessionStoreError
from devicebridge.storage.children import process_cpu_s, start_helper
from devicebridge.storage.compactor import COMPACTOR
from devicebridge.storage.desk import (
    close_desk,
    commit_rows,
    cross_core_dataclasses,
    finish_session_rows,
    nothing,
    release_admitted_run,
    shared_object,
    write_rows,
)
from devicebridge.storage.lock import mark_process_alive
from devicebridge.storage.sessions import ChunkRow, DecisionRow, SessionStore, decision_row

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


# How many bytes of jobs the pipe to the writer's process holds (Linux; elsewhere the
# system's size): a few seconds of a hundred devices' telemetry, so that a writer behind
# for a moment does not hold up the loop that hands it its jobs.
JOB_PIPE_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031  # fcntl(2), Linux


# Wall seconds for the compaction's wait (a name of its own, so that tests can move it).
_now_s = time.monotonic


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


# How many shared objects (policies, routines) the writer's process keeps at most: the
# least recently named is forgotten past this, here and there. A routine per device of a
# hundred (``python -m bench latency``) fits; a routine parsed again for each run (a
# pushed program) takes a slot each time, and is forgotten in turn.
SHARED_OBJECTS: Final = 256


class _Shared:
    """Objects jobs name again and again, sent to the writer's process once and named by a
    token afterwards: a policy (ten kilobytes to pickle) and a routine (a dozen
    dataclasses), both in every admission. At 100 devices ending and starting runs
    (``python -m bench latency``), pickling the routine was the biggest part of a run's
    start on the event loop. At most ``SHARED_OBJECTS`` are kept, by identity (each kept
    alive while it has its token): the least recently named is forgotten."""

    def __init__(self) -> None:
        self.tokens: dict[int, tuple[object, int]] = {}  # by id(), least recent first
        self.forgotten: list[int] = []  # tokens the writer's process may drop
        self._next_token = itertools.count()

    def token(self, obj: object) -> int:
        known = self.tokens.pop(id(obj), None)
        if known is None:
            known = (obj, next(self._next_token))
            if len(self.tokens) >= SHARED_OBJECTS:
                oldest = next(iter(self.tokens))
                self.forgotten.append(self.tokens.pop(oldest)[1])
        self.tokens[id(obj)] = known  # the most recent, last
        return known[1]


_SHARED_TYPES: Final = (SafetyPolicy, Routine)


class _JobPickler(pickle.Pickler):
    """Pickles a job, naming every safety policy and routine in it by its token
    (:class:`_Shared`) (used for the jobs given one: the others, only the C pickler).

    ``reducer_override`` is called only for objects other than numbers, strings, bytes
    and the builtin containers (``persistent_id`` would be called for every one of a
    flush's thousands: milliseconds of the loop's time).
    """

    def __init__(self, file: io.BytesIO, shared: _Shared) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._shared = shared
        self.named: dict[int, object] = {}  # the objects named, by token

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, _SHARED_TYPES):
            return NotImplemented
        token = self._shared.token(obj)
        self.named[token] = obj
        return (shared_object, (token,))


# What a job sends or answers crosses whole, also from the compiled build.
cross_core_dataclasses()


class _Child:
    """One writer's process, and the pipes of its jobs and answers."""

    def __init__(self) -> None:
        from multiprocessing.connection import Connection

        self.process = start_helper("devicebridge.storage.writer_process")
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        if sys.platform == "linux":
            with contextlib.suppress(OSError):  # refused: the system's size
                fcntl.fcntl(self.process.stdin.fileno(), _F_SETPIPE_SZ, JOB_PIPE_BYTES)
        self.jobs = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.answers = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.answers_fd = self.answers.fileno()
        self._poller = select.poll()
        self._poller.register(self.answers_fd, select.POLLIN)
        self.broken = False  # a job could not be sent: the next job starts another
        self.ended = False  # its answers ended (it exited, or was killed)
        self.shared: set[int] = set()  # tokens of the objects it has
        # The event loops that read its answers as they come (loop -> nothing).
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, None] = (
            weakref.WeakKeyDictionary()
        )

    def answered(self, timeout_s: float) -> bool:
        """An answer (or the end of them) waits to be read, within ``timeout_s``."""
        return bool(self._poller.poll(max(0, int(timeout_s * 1000))))


class _Job(Future[T]):
    """A job's future: waiting for its result reads the writer's answers when no event
    loop of this thread does (a run on the virtual clock, a blocking caller)."""

    def __init__(self, owner: _WriterProcess) -> None:
        super().__init__()
        self._owner = owner
        self.child: _Child | None = None  # the process it was sent to

    def result(self, timeout: float | None = None) -> T:
        self._owner.wait_for(self, timeout)
        return super().result(timeout=0 if timeout is not None else None)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._owner.wait_for(self, timeout)
        return super().exception(timeout=0 if timeout is not None else None)


class _WriterProcess:
    """The one process that writes every session store of this process, seen from here.

    Started with the first job, it runs the jobs of every writer one at a time in the
    order they were sent (each writer's jobs keep theirs) and answers each. The stores'
    work is SQLite and Python that holds a GIL for most of its time: on a thread of the
    bridge's process it took the GIL from the event loop while frames waited (``python -m
    bench latency``, 100 devices: the runner's p99 2-5 times the observer's with that
    thread, 1.3-1.7 times with no store at all), and so did a thread here that only
    relayed the process's answers. So no thread of this process waits for them: the
    event loop that sent a job reads the answers when they come (a reader on their pipe),
    and a caller that blocks on a job's result reads them itself (:class:`_Job`); the
    bridge's thread pickles each job and writes it to a pipe (microseconds; a quarter
    second of a hundred devices' telemetry, a few hundred).

    A bridge has one store; a QA run has one per simulated person: one process for all
    (fifty processes, or threads, cost far more than one for the same commits). The
    process ends when its stdin closes: at this process's exit (after its last jobs),
    or when this process is killed (it still does every job it was sent).
    """

    def __init__(self) -> None:
        # Sends (and starts) under one lock, reads of answers under another, the futures
        # waiting under a third: a reader never waits for a sender blocked on a full pipe.
        self._send_lock = threading.Lock()
        # Reentrant: a job's callback, run where its answer was read, may wait for another.
        self._read_lock = threading.RLock()
        self._waiting_lock = threading.Lock()
        self._child: _Child | None = None
        self._waiting: dict[int, tuple[Future[Any], Path, _Child]] = {}
        self._job_ids = itertools.count()
        self._shared = _Shared()
        self._exit_hook = False

    def submit(
        self, writer_id: int, path: Path, function: Callable[..., T], args: tuple[Any, ...]
    ) -> Future[T]:
        future: _Job[T] = _Job(self)
        job_id = -1
        with self._send_lock:
            child = self._child
            try:
                named: dict[int, object] = {}
                if any(isinstance(arg, _SHARED_TYPES) for arg in args):
                    buffer = io.BytesIO()
                    pickler = _JobPickler(buffer, self._shared)
                    pickler.dump((function, args))
                    body, named = buffer.getvalue(), pickler.named
                else:  # the C pickler alone (most jobs: rows, records)
                    body = pickle.dumps((function, args), pickle.HIGHEST_PROTOCOL)
                child = self._running_child()
                self._read_on_this_loop(child)
                for token, obj in named.items():  # sent once to each process
                    if token not in child.shared:
                        child.jobs.send_bytes(
                            pickle.dumps(("share", token, obj), pickle.HIGHEST_PROTOCOL)
                        )
                        child.shared.add(token)
                forgotten, self._shared.forgotten = self._shared.forgotten, []
                for token in forgotten:  # after every job that named it
                    if token in child.shared:
                        child.jobs.send_bytes(pickle.dumps(("forget", token)))
                        child.shared.discard(token)
                job_id = next(self._job_ids)
                with self._waiting_lock:
                    self._waiting[job_id] = (future, path, child)
                future.child = child
                child.jobs.send_bytes(
                    pickle.dumps(
                        ("job", job_id, writer_id, str(path), body),
                        pickle.HIGHEST_PROTOCOL,
                    )
                )
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
                if isinstance(exc, OSError) and child is not None:
                    child.broken = True  # gone: the next job starts another
                with self._waiting_lock:
                    self._waiting.pop(job_id, None)
                if not future.done():
                    future.set_exception(
                        SessionStoreError(f"the store writer took no job: {exc}", path=path)
                    )
        return future

    def start_soon(self) -> None:
        with self._send_lock:
            self._running_child()

    def _running_child(self) -> _Child:
        """The process that takes jobs now, started if there is none (send lock held)."""
        child = self._child
        if child is None or child.broken or child.ended:
            child = self._start()
        return child

    def _start(self) -> _Child:
        old = self._child
        if old is not None and not old.ended:  # broken: its pipe refused a job
            with contextlib.suppress(OSError):
                old.process.kill()
            self._ended(old)  # its jobs fail; it is reaped
        if old is not None:
            with contextlib.suppress(OSError):
                old.jobs.close()
                old.answers.close()
        child = self._child = _Child()
        if not self._exit_hook:
            atexit.register(self.close)
            self._exit_hook = True
        return child

    def _read_on_this_loop(self, child: _Child) -> None:
        """The running event loop (if any) reads ``child``'s answers as they come."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop not in child.loops:
            loop.add_reader(child.answers_fd, self._read_ready, child)
            child.loops[loop] = None

    def _read_ready(self, child: _Child) -> None:
        """On an event loop: every answer of ``child`` that has come (if no other thread
        reads them now: it hands this loop's answers over the same way)."""
        if self._read_lock.acquire(blocking=False):
            try:
                while not child.ended and child.answered(0):
                    self._read_one(child)
            finally:
                self._read_lock.release()

    def wait_for(self, job: _Job[Any], timeout_s: float | None) -> None:
        """Read answers until ``job`` is done (or ``timeout_s`` has passed)."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while not job.done():
            child = job.child
            left_s = 1.0 if deadline_s is None else deadline_s - time.monotonic()
            if child is None or left_s <= 0:  # never sent (done, then), or too long
                return
            with self._read_lock:
                if not job.done() and not child.ended and child.answered(min(left_s, 1.0)):
                    self._read_one(child)

    def _read_one(self, child: _Child) -> None:
        """One answer of ``child`` (the read lock held), or the end of its answers."""
        try:
            job_id, ok, outcome = pickle.loads(child.answers.recv_bytes())
        except (EOFError, OSError):
            self._ended(child)
            return
        with self._waiting_lock:
            future, path, _ = self._waiting.pop(job_id)
        if ok:
            future.set_result(outcome)
        else:
            future.set_exception(_raised(outcome, path))

    def _ended(self, child: _Child) -> None:
        """``child``'s answers ended (it exited, or was killed): its jobs fail."""
        child.ended = True
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop in list(child.loops):
            if loop.is_closed():
                continue
            if loop is running:
                loop.remove_reader(child.answers_fd)
            else:
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(loop.remove_reader, child.answers_fd)
        child.loops.clear()
        status = child.process.wait()
        with self._waiting_lock:
            gone = [job for job, (*_, sent_to) in self._waiting.items() if sent_to is child]
            unanswered = [self._waiting.pop(job)[:2] for job in gone]
        for future, path in unanswered:
            future.set_exception(
                SessionStoreError(
                    f"the store writer's process ended (exit status {status})", path=path
                )
            )

    def close(self) -> None:
        """Let the process do every job sent, and end (at this process's exit)."""
        with self._send_lock:
            child, self._child = self._child, None
        if child is None:
            return
        child.jobs.close()
        try:
            child.process.wait(PROCESS_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()

    def cpu_s(self) -> float:
        """CPU seconds the current writer's process has used so far (0.0 with none; for
        benchmarks: its work is the bridge's)."""
        pid = self.pid
        return 0.0 if pid is None else process_cpu_s(pid)

    @property
    def pid(self) -> int | None:
        """The process's id, while it runs (for tests)."""
        child = self._child
        return child.process.pid if child is not None and child.process.poll() is None else None

    def forget(self) -> None:
        """In a forked child: the parent's process is not ours (a job starts another)."""
        child = self._child
        if child is not None:
            with contextlib.suppress(OSError):  # this fork's copies: the parent's stay open
                child.jobs.close()
                child.answers.close()
        self.__init__()  # type: ignore[misc]


def _raised(outcome: Any, path: Path) -> BaseException:
    """The exception a job raised, from what the writer's process sent back."""
    if isinstance(outcome, BaseException):
        return outcome
    return SessionStoreError(f"the store writer failed:\n{outcome}", path=path)


# How long this process's exit waits for the writer's last jobs (wall seconds).
PROCESS_EXIT_WAIT_S: Final = 30.0

_WRITER_PROCESS: Final = _WriterProcess()


def start_store_writer() -> None:
    """Start the store writer's process now, if it does not run, so that it is ready for
    the first job, and the compactor's, ready for the first finished session (each takes a
    few hundredths of a second to start; this does not wait for them)."""
    _WRITER_PROCESS.start_soon()
    COMPACTOR.start_soon()


def writer_cpu_s() -> float:
    """CPU seconds the store writer's process of this process has used (see
    :meth:`_WriterProcess.cpu_s`)."""
    return _WRITER_PROCESS.cpu_s()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WRITER_PROCESS.forget)
_writer_ids: Final = itertools.count()


@dataclass(slots=True)
class _SampleRun:
    """Contiguous batches of one session waiting for the writer: one row once committed.

    A row per 100 ms batch made the writer hand the GIL back and forth with the event
    loop for every row, which cost the loop more than the writing itself. Each batch's
    bytes are appended as it comes (a microsecond), so that a flush of a hundred
    sessions' rows is not one long callback of the loop joining them all.
    """

    session_id: int
    first_sequence: int
    end_sequence: int
    data: bytearray
    received_at: str  # ISO 8601, UTC: when its write group's first batch arrived

    def row(self) -> ChunkRow:
        count = self.end_sequence - self.first_sequence
        return (self.session_id, self.first_sequence, count, self.received_at, bytes(self.data))


class StoreWriter:
    """Groups the telemetry and decisions of every run on one store into one commit.

    Commits ``interval_s`` after the first row waiting, through a connection of its own
    in the writer's process (:class:`_WriterProcess`), so neither the commits, nor
    SQLite's checkpoints (fsync), nor the Python around them hold up the event loop.
    :meth:`finish_session` writes what is left of one run and its record in one job
    (:meth:`commit_session`, what is left alone); a run waits for its own jobs with
    :func:`devicebridge.clock.result_off_loop`, which keeps the loop serving other
    devices on the wall clock and keeps a virtual-clock run deterministic.

    A job (:meth:`submit`) is a function defined at a module's top level (it is sent by
    name), called in the writer's process with the writer's :class:`StoreDesk` and the
    arguments given (pickled), one job at a time, after the jobs sent before it.
    """

    def __init__(self, store: SessionStore, *, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.path = store.path
        self.interval_s = interval_s
        self._id = next(_writer_ids)
        start_store_writer()
        # The sessions stored through the writer's process name this process as their
        # owner (recovery leaves them alone while it runs): it says it is alive itself.
        mark_process_alive(store.path.parent)
        self._closed: list[_SampleRun] = []  # runs a gap ended, waiting for the process
        self._runs: dict[int, _SampleRun] = {}  # the open run of each session
        self._decisions: list[tuple[int, Sequence[DecisionRow]]] = []
        self._in_flight: list[tuple[Future[None], frozenset[int]]] = []
        self._timer: asyncio.Handle | None = None
        # The arrival time of the runs begun since the last submit: one clock reading and
        # ISO string per write group instead of one per device and group (a run's stamp is
        # at most ``interval_s`` older than its first batch).
        self._received_at: str | None = None
        # Sessions whose record is stored, to compact (appended where their job's answer
        # arrived, taken on the loop; a deque's append and popleft are atomic).
        self._finished: deque[int] = deque()
        self._finishing: list[Future[None]] = []  # records sent, not answered yet
        self._compactions = 0  # finished since compactions were last waited for
        self._streamed_at_s = -math.inf  # (monotonic) the last write that held samples
        self._first_waiting_s: float | None = None  # (monotonic) since a compaction waits
        self._idle_check: asyncio.TimerHandle | None = None
        self._closing = False

    def add_samples(
        self, session_id: int, first_sequence: int, samples: np.ndarray[Any, Any]
    ) -> None:
        count = int(samples.shape[0])
        run = self._runs.get(session_id)
        if run is not None and run.end_sequence == first_sequence:
            run.data += samples.tobytes()
            run.end_sequence += count
        else:
            if run is not None:
                self._closed.append(run)
            received_at = self._received_at
            if received_at is None:
                received_at = self._received_at = _utc_now_iso()
            self._runs[session_id] = _SampleRun(
                session_id,
                first_sequence,
                first_sequence + count,
                bytearray(samples.tobytes()),
                received_at,
            )
        if self._timer is None:  # else _schedule() has nothing to do
            self._schedule()

    def add_decisions(self, session_id: int, decisions: Sequence[Decision]) -> None:
        self._decisions.append((session_id, [decision_row(d) for d in decisions]))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._submit)

    def _submit(self) -> None:
        """Hand everything added so far to the writer's process (its jobs run in order)."""
        self._timer = None
        self._received_at = None
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
        job = self.submit(write_rows, [run.row() for run in runs], decisions)
        self._in_flight.append((job, sessions))

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """``function(desk, *args)`` in the writer's process, after the jobs before it.

        A run's own writes go this way too, so the two connections never wait for each
        other's lock (SQLite's busy wait sleeps in steps of milliseconds). A run on the
        event loop waits for it with :func:`devicebridge.clock.result_off_loop`.
        """
        self._prune()
        return _WRITER_PROCESS.submit(self._id, self.path, function, args)

    def admitted_run_ended(self, run_key: int) -> None:
        """Run ``run_key`` no longer counts as admitted (:attr:`StoreDesk.admitted_runs`),
        once the jobs before this one are done: its stored session, if any, counts from
        then on."""
        if not self._closing:
            self.submit(release_admitted_run, run_key)

    def run_now(self, function: Callable[..., T], *args: Any) -> T:
        """:meth:`submit`, waiting for the result (blocks)."""
        return self.submit(function, *args).result()

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

        Its rows still waiting are written after the earlier writes (decisions keep their
        order). The job raises :class:`SessionStoreError` if any of its rows could not be
        stored.
        """
        rows, decisions = self._take_waiting(session_id)
        return self.submit(commit_rows, session_id, rows, decisions)

    def _take_waiting(
        self, session_id: int
    ) -> tuple[list[ChunkRow], list[tuple[int, Sequence[DecisionRow]]]]:
        """The rows of ``session_id`` waiting here for the next commit, taken out."""
        runs = [run for run in self._closed if run.session_id == session_id]
        run = self._runs.pop(session_id, None)
        if run is not None:
            runs.append(run)
        if runs:
            self._closed = [run for run in self._closed if run.session_id != session_id]
        decisions = [d for d in self._decisions if d[0] == session_id]
        if decisions:
            self._decisions = [d for d in self._decisions if d[0] != session_id]
        return [run.row() for run in runs], decisions

    def finish_session(
        self, session_id: int, *, admitted_run: int | None = None, **record: Any
    ) -> Future[None]:
        """:meth:`SessionStore.finish_session` in the writer's process, after the rows of
        the session still waiting here (one job: a run's end is one round trip), and the
        end of ``admitted_run`` (:meth:`admitted_run_ended`) right behind it, so that no
        admission reads the one without the other. The job raises
        :class:`SessionStoreError` if any of the session's rows could not be stored (its
        record is finished all the same).

        The session's telemetry is compacted later, in the compactor's process
        (:mod:`devicebridge.storage.compactor`), once no telemetry has been written for
        ``COMPACT_IDLE_S`` (at most ``COMPACT_WAIT_S`` after it ended), or when the
        writer closes."""
        rows, decisions = self._take_waiting(session_id)
        job = self.submit(finish_session_rows, session_id, rows, decisions, record, admitted_run)
        self._compactions += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop, so no telemetry streams: once it is stored
            job.add_done_callback(functools.partial(self._compact_once_stored, session_id))
            return job
        job.add_done_callback(functools.partial(self._finished_stored, session_id))
        # Only the unanswered ones: an answered job kept here would keep its future, its
        # callbacks and the awaiting run's future alive until the next compaction (a
        # minute of a busy bridge's session ends, promoted through every GC generation).
        self._finishing = [waiting for waiting in self._finishing if not waiting.done()]
        self._finishing.append(job)
        if self._first_waiting_s is None:
            self._first_waiting_s = _now_s()
        if self._idle_check is None:
            self._idle_check = loop.call_later(COMPACT_IDLE_S, self._compact_when_idle)
        return job

    def _finished_stored(self, session_id: int, finished: Future[None]) -> None:
        # Where its answer arrived (or here, if it was done already): it may be compacted.
        if not finished.cancelled() and finished.exception() is None:
            self._finished.append(session_id)

    def _compact_once_stored(self, session_id: int, finished: Future[None]) -> None:
        self._finished_stored(session_id, finished)
        self._compact_finished()

    def _compact_when_idle(self) -> None:
        """Hand the finished sessions to the compactor once telemetry has paused, or
        once the first of them has waited long enough; else look again later."""
        self._idle_check = None
        now_s = _now_s()
        waited_s = 0.0 if self._first_waiting_s is None else now_s - self._first_waiting_s
        idle_s = now_s - self._streamed_at_s
        if idle_s >= COMPACT_IDLE_S or waited_s >= COMPACT_WAIT_S:
            self._first_waiting_s = None
            self._finishing = [job for job in self._finishing if not job.done()]
            self._compact_finished()
            if self._finishing:  # their records are not stored yet: at the next look
                self._first_waiting_s = now_s
                self._idle_check = asyncio.get_running_loop().call_later(
                    COMPACT_IDLE_S, self._compact_when_idle
                )
        else:
            delay_s = min(COMPACT_IDLE_S - idle_s, COMPACT_WAIT_S - waited_s)
            self._idle_check = asyncio.get_running_loop().call_later(
                delay_s, self._compact_when_idle
            )

    def _compact_finished(self) -> None:
        """Every session whose record is stored so far to the compactor (it never waits)."""
        finished = []
        with contextlib.suppress(IndexError):
            while True:
                finished.append(self._finished.popleft())
        if finished:
            COMPACTOR.compact(self.path, finished)

    def wait_compacted(self) -> None:
        """Every session finished so far compacted (for tests and benchmarks; blocks)."""
        self._compactions = 0
        self.run_now(nothing)  # every record finished so far is stored, and answered
        self._compact_finished()
        COMPACTOR.sync()

    def close(self) -> None:
        """Hand the last write and the store's closing to the writer's process, without
        waiting for them, unless sessions finished on it since compactions were last
        waited for: then wait until they are compacted, so that nothing opens the file
        once the writer's owner closed it (a run's compaction takes a fraction of a
        second)."""
        if self._closing:
            return
        self._closing = True
        for handle in (self._timer, self._idle_check):
            if handle is not None:
                handle.cancel()
        self._idle_check = None
        self._submit()
        if self._compactions:
            self.wait_compacted()
        self.submit(close_desk)
