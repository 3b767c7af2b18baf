"""The store writer's threads yield to the event loop: a lower OS priority (Linux)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

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
def test_the_writer_and_compactor_threads_run_below_the_loop(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with SessionStore(tmp_path / "s.sqlite3") as store:
        writer = StoreWriter(store)
        try:
            session = writer.submit(open_session).result(timeout=10)
            # Finishing a session compacts it on the compactor's thread.
            writer.finish_session(session, status="completed", end_reason=None, summary={})
            writer.wait_compacted()  # so both threads have started
            niceness = threads_nice()
            policies = {
                thread.name.split("_")[0]: os.sched_getscheduler(thread.native_id or 0)
                for thread in threading.enumerate()
                if thread.name.startswith("session-")
            }
        finally:
            writer.close()
    expected = min(19, own + BACKGROUND_NICE_INCREMENT)
    ours = {name: nice for name, nice in niceness.items() if name.startswith("session-")}
    assert {name.split("_")[0] for name in ours} == {"session-store", "session-compact"}
    assert set(ours.values()) == {expected}
    # Compaction, which can wait, runs only on a core nothing else wants.
    assert policies == {"session-store": os.SCHED_OTHER, "session-compact": os.SCHED_IDLE}
    assert niceness[threading.current_thread().name] == own  # the event loop's thread
