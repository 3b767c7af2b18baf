"""The store writer's process: one for every store of a process, below the event loop's
priority (the compactor's below it, on idle cores only), its jobs run in order, their
failures back where they were sent, and a killed process replaced at the next job."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devicebridge.errors import SessionStoreError
from devicebridge.storage.compactor import COMPACTOR
from devicebridge.storage.sessions import SessionStore
from devicebridge.storage.writer import _WRITER_PROCESS, SHARED_OBJECTS, StoreWriter

from .writer_jobs import (
    bug_job,
    failing_job,
    nothing_job,
    open_session_job,
    policy_limits_job,
    shared_count_job,
    spin_job,
    where_job,
)


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_IDLE is Linux's")
def test_the_writer_and_the_compactor_run_in_processes_on_idle_cores_only(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            session = writer.run_now(open_session_job)
            # A finished session is compacted in the compactor's process.
            writer.finish_session(session, status="completed", end_reason=None, summary={})
            writer.wait_compacted()  # so that the compactor has started
            writer_pid, _ = writer.run_now(where_job)
            compactor = COMPACTOR.pid
            assert compactor is not None
            compactor_nice = os.getpriority(os.PRIO_PROCESS, compactor)
            compactor_policy = os.sched_getscheduler(compactor)
            writer_nice = os.getpriority(os.PRIO_PROCESS, writer_pid)
            writer_policy = os.sched_getscheduler(writer_pid)
        finally:
            writer.close()
    # Neither holds the lock the loop's thread needs (the GIL): other processes.
    assert os.getpid() not in (writer_pid, compactor)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the event loop's is untouched
    # Both run only on a core nothing else wants: a waking loop takes it at once.
    assert (writer_nice, writer_policy) == (19, os.SCHED_IDLE)
    assert (compactor_nice, compactor_policy) == (19, os.SCHED_IDLE)
    # No thread here waits for its answers either: a caller reads them.
    assert [t.name for t in threading.enumerate()] == [threading.current_thread().name]


def test_every_store_of_a_process_is_written_by_one_process(tmp_path: Path) -> None:
    """A QA run has a store per simulated person: one process writes them all, each
    writer's jobs in order, each store in its own file."""
    stores = [SessionStore(tmp_path / f"person-{k}.sqlite3") for k in range(3)]
    writers = [StoreWriter(store) for store in stores]
    try:
        where = {w.run_now(where_job) for w in writers}
        assert len(where) == 1
        ((pid, _),) = where
        assert pid != os.getpid()
        sessions = [w.run_now(open_session_job) for w in writers]
        writers[0].close()
        # The others go on writing, each in its own file.
        for writer, session in zip(writers[1:], sessions[1:], strict=True):
            writer.finish_session(session, status="completed", end_reason=None, summary={})
            writer.run_now(nothing_job)
        statuses = [
            store.session(session).status for store, session in zip(stores, sessions, strict=True)
        ]
        assert statuses == ["running", "completed", "completed"]
    finally:
        for writer in writers:
            writer.close()
        for store in stores:
            store.close()


def test_a_job_that_fails_raises_where_it_was_sent(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            with pytest.raises(SessionStoreError, match="disk full") as raised:
                writer.run_now(failing_job)
            assert raised.value.path == store.path
            # An exception that cannot cross whole comes as its traceback.
            with pytest.raises(SessionStoreError, match="_Unpicklable: a bug in a job"):
                writer.run_now(bug_job)
            # The process goes on with the next job.
            assert writer.run_now(open_session_job) == 1
        finally:
            writer.close()


def test_a_killed_writer_process_fails_its_jobs_and_is_replaced(tmp_path: Path) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            first, _ = writer.run_now(where_job)
            os.kill(first, signal.SIGKILL)
            with contextlib.suppress(SessionStoreError):
                writer.run_now(nothing_job)  # sent before the kill was seen, or refused
            with contextlib.suppress(ChildProcessError):
                os.waitpid(first, 0)
            second, _ = writer.run_now(where_job)
            assert second != first
            session = writer.run_now(open_session_job)
            assert store.session(session).status == "running"
            assert _WRITER_PROCESS.pid == second
        finally:
            writer.close()


def test_a_new_writer_process_answers_a_run_s_first_job_without_the_host_s_heavy_modules(
    tmp_path: Path,
) -> None:
    """A run waits for its first job (its session's record): the writer's process answers
    it with the store and the job's module loaded, not the runner, the engines or the
    device layers (a few tenths of a second of imports, which a QA run or a ``devicebridge
    run`` waited for)."""
    import devicebridge
    from devicebridge.core.policy import default_policy
    from devicebridge.core.routine import parse_routine
    from devicebridge.run import store_jobs
    from devicebridge.run.runner import _session_fields

    from .light_jobs import modules_loaded_job

    starter = Path(devicebridge.__file__).parent / "data/routines/lymphatic_drainage.toml"
    routine = parse_routine(starter.read_text(), default_policy())
    record = _session_fields(routine, "SIM-1", 100.0, None, datetime.now(UTC))
    _WRITER_PROCESS.close()  # the next job starts a new process
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            session = writer.run_now(store_jobs.start_session, record, None)
            loaded = writer.run_now(modules_loaded_job, ("devicebridge", "bleak", "asyncio"))
        finally:
            writer.close()
    assert store_jobs.__name__ in loaded
    heavy = {"devicebridge.run.runner", "devicebridge.core.engine", "devicebridge.device"}
    heavy |= {"devicebridge.storage.writer", "devicebridge.core.admission", "bleak", "asyncio"}
    assert heavy.isdisjoint(loaded)
    with SessionStore(tmp_path / "s.sqlite3") as store:
        assert store.session(session).routine_name == routine.name


def test_policies_routines_and_admissions_cross_to_the_writer_whole() -> None:
    """What admission sends and answers survives pickling as itself (also compiled: a
    frozen dataclass compiled with mypyc crosses through its __init__)."""
    import pickle
    from datetime import UTC, datetime
    from importlib.resources import files

    import devicebridge.storage.writer  # noqa: F401 - registers how they cross
    from devicebridge.core.policy import default_policy
    from devicebridge.core.routine import parse_routine
    from devicebridge.run.history import check_routine_admission

    policy = default_policy()
    assert pickle.loads(pickle.dumps(policy, pickle.HIGHEST_PROTOCOL)) == policy
    folder = files("devicebridge") / "data" / "routines"
    texts = [item.read_text() for item in folder.iterdir() if item.name.endswith(".toml")]
    assert len(texts) >= 5
    for text in texts:
        routine = parse_routine(text, policy, label="shipped")
        assert pickle.loads(pickle.dumps(routine, pickle.HIGHEST_PROTOCOL)) == routine
        admission = check_routine_admission(routine, policy, None, now=datetime.now(UTC))
        assert pickle.loads(pickle.dumps(admission, pickle.HIGHEST_PROTOCOL)) == admission


@pytest.mark.skipif(sys.platform != "linux", reason="read from /proc")
def test_the_cpu_the_writer_uses_is_counted_for_benchmarks(tmp_path: Path) -> None:
    from devicebridge.storage.writer import writer_cpu_s

    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            writer.run_now(nothing_job)
            before_s = writer_cpu_s()
            writer.run_now(spin_job, 0.2)
            assert writer_cpu_s() - before_s >= 0.15
        finally:
            writer.close()


def test_a_policy_goes_once_to_each_writer_process_and_comes_back_whole(tmp_path: Path) -> None:
    from devicebridge.core.policy import default_policy

    policy = default_policy()
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            assert writer.run_now(policy_limits_job, policy) == policy
            assert writer.run_now(policy_limits_job, policy) == policy  # named, not sent
            first, _ = writer.run_now(where_job)
            os.kill(first, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(first, 0)
            with contextlib.suppress(SessionStoreError):
                writer.run_now(nothing_job)  # the kill seen
            # A new process gets the policy again before the job that names it.
            assert writer.run_now(policy_limits_job, policy) == policy
            assert writer.run_now(where_job)[0] != first
        finally:
            writer.close()


def test_routines_are_shared_like_policies_and_the_least_recent_are_forgotten(
    tmp_path: Path,
) -> None:
    # Every admission sends its routine and policy: each goes once, and a bridge that
    # runs ever new routines (a clinic's programs) keeps only the most recent ones.
    from devicebridge.core.policy import default_policy
    from devicebridge.core.routine import parse_routine
    from tests.routines.conftest import massage_routine, massage_step

    policy = default_policy()
    text = massage_routine(massage_step("cheek_left", 5, 4.0, 12.0))
    routines = [parse_routine(text, policy, label=f"r{n}.toml") for n in range(SHARED_OBJECTS + 6)]
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            for routine in routines:
                assert writer.run_now(policy_limits_job, routine, policy) == (routine, policy)
            assert writer.run_now(shared_count_job) == SHARED_OBJECTS
            # The first routine was forgotten: named again, it is sent again.
            assert writer.run_now(policy_limits_job, routines[0]) == routines[0]
            assert writer.run_now(shared_count_job) == SHARED_OBJECTS
        finally:
            writer.close()


async def test_an_answered_session_end_is_not_kept_while_compaction_waits(tmp_path: Path) -> None:
    """On a busy bridge sessions end every few seconds, and their compaction waits for a
    pause in the telemetry (up to COMPACT_WAIT_S): what waits is the session's id, not its
    answered job (a future with its lock and callbacks, and the run's future awaiting it),
    which kept a minute of session ends alive through every GC generation."""
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            first, second = writer.run_now(open_session_job), writer.run_now(open_session_job)
            job = writer.finish_session(first, status="completed", end_reason=None, summary={})
            job.result()  # answered
            answered = weakref.ref(job)
            del job
            writer.finish_session(second, status="completed", end_reason=None, summary={}).result()
            assert answered() is None
        finally:
            writer.close()
    with SessionStore(tmp_path / "s.sqlite3") as store:  # both stored (and compacted)
        assert [store.session(s).status for s in (first, second)] == ["completed"] * 2
