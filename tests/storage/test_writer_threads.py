"""The store writer's thread and the compactor's process yield to the event loop (Linux)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from devicebridge.storage.compactor import COMPACTOR
from devicebridge.storage.sessions import SessionStore
from devicebridge.storage.writer import BACKGROUND_NICE_INCREMENT, StoreWriter

from .test_sessions import open_session


def threads_nice() -> dict[str, int]:
    """The nice value of each Python thread of this process, by name (from /proc)."""
    found = {}
    for thread in threading.enumerate():
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        found[thread.name] = int(stat[stat.rindex(")") + 2 :].split()[16])  # proc(5) field 19
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_the_writer_thread_and_the_compactor_process_run_below_the_loop(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            session = writer.submit(open_session).result(timeout=10)
            # A finished session is compacted in the compactor's process.
            writer.finish_session(session, status="completed", end_reason=None, summary={})
            writer.wait_compacted()  # so the thread and the process have started
            niceness = threads_nice()
            compactor = COMPACTOR.pid
            assert compactor is not None
            compactor_nice = os.getpriority(os.PRIO_PROCESS, compactor)
            compactor_policy = os.sched_getscheduler(compactor)
        finally:
            writer.close()
    expected = min(19, own + BACKGROUND_NICE_INCREMENT)
    ours = {name: nice for name, nice in niceness.items() if name.startswith("session-")}
    assert {name.split("_")[0] for name in ours} == {"session-store"}
    assert set(ours.values()) == {expected}
    assert niceness[threading.current_thread().name] == own  # the event loop's thread
    # Compaction, which can wait, runs only on a core nothing else wants, and holds no
    # lock the loop's thread needs (the GIL): another process.
    assert compactor != os.getpid()
    assert (compactor_nice, compactor_policy) == (19, os.SCHED_IDLE)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("session-store")]


def test_every_store_of_a_process_is_written_by_one_thread(tmp_path: Path) -> None:
    """A QA run has a store per simulated person: one thread writes them all, each
    writer's jobs in order, and it goes once the last writer closed."""
    for thread in writer_threads():  # left by an earlier test's writers, on their way out
        thread.join(timeout=1)
    # A writer another test left open keeps the thread: ours then join it.
    before = writer_threads()
    stores = [SessionStore(tmp_path / f"person-{k}.sqlite3") for k in range(3)]
    writers = [StoreWriter(store) for store in stores]
    try:
        threads = {w.submit(lambda _: threading.get_ident()).result(timeout=10) for w in writers}
        assert len(threads) == 1
        assert len(writer_threads()) == 1
        sessions = [w.submit(open_session).result(timeout=10) for w in writers]
        writers[0].close()
        # The others go on writing, each in its own file.
        for writer, session in zip(writers[1:], sessions[1:], strict=True):
            writer.finish_session(session, status="completed", end_reason=None, summary={})
            writer.run_now(lambda _: None)
        statuses = [
            store.session(session).status for store, session in zip(stores, sessions, strict=True)
        ]
        assert statuses == ["running", "completed", "completed"]
    finally:
        for writer in writers:
            writer.close()
        for store in stores:
            store.close()
    for thread in writer_threads():
        if thread not in before:
            thread.join(timeout=10)
    assert writer_threads() == before
