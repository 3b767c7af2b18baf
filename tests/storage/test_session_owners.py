"""Recovery takes only the sessions of processes that ended: two commands may run
sessions on one data directory at once (two `run`s on two devices)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from devicebridge.storage.sessions import SessionStore
from protocols import SampleFormat

TIMEOUT_S = 60.0  # a hang net for the helper process; not a correctness wait


def _run_a_session(path: str, started: multiprocessing.synchronize.Event) -> None:
    store = SessionStore(Path(path))
    store.start_session(
        routine_name="r",
        category="c",
        device_serial="OTHER",
        device_kind="massager",
        sample_format=SampleFormat.MASSAGER_V1,
        sample_rate_hz=100.0,
    )
    started.set()
    signal.pause()  # runs its session until it is killed


def test_a_running_process_keeps_its_session_and_a_killed_one_loses_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / "sessions.sqlite3"
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    other = context.Process(target=_run_a_session, args=(str(path), started))
    other.start()
    try:
        assert started.wait(TIMEOUT_S)
        with SessionStore(path) as store:
            assert store.recover() == []  # the other process still runs its session
            (record,) = store.sessions()
            assert record.status == "running"
    finally:
        assert other.pid is not None
        os.kill(other.pid, signal.SIGKILL)
        other.join(TIMEOUT_S)
    with SessionStore(path) as store:
        assert store.recover() == [record.id]
        assert store.session(record.id).status == "interrupted"
        assert store.recover() == []
