"""Recovery takes only the sessions of processes that ended: two commands may run
sessions on one data directory at once (two `run`s on two devices)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from devicebridge.storage.sessions import SessionStore
from protocols import SampleFormat

TIMEOUT_S = 60.0  # a hang net for the helper process; not a correctness wait


def _start_a_session(store: SessionStore, device_serial: str) -> int:
    return store.start_session(
        routine_name="r",
        category="c",
        device_serial=device_serial,
        device_kind="massager",
        sample_format=SampleFormat.MASSAGER_V1,
        sample_rate_hz=100.0,
    )


def _run_a_session(path: str, started: multiprocessing.synchronize.Event) -> None:
    _start_a_session(SessionStore(Path(path)), "OTHER")
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


def test_a_process_marks_a_data_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every session's start marks its store's directory; after the first, the mark is
    not looked for on the file system again (its path is not resolved anew)."""
    store_path = tmp_path / "data" / "sessions.sqlite3"
    resolved: list[Path] = []
    original_resolve = Path.resolve

    def counting_resolve(self: Path, strict: bool = False) -> Path:
        resolved.append(self)
        return original_resolve(self, strict)

    with SessionStore(store_path) as store:
        monkeypatch.setattr(Path, "resolve", counting_resolve)
        for _ in range(3):
            _start_a_session(store, "S")
        monkeypatch.undo()
        assert resolved.count(store_path.parent) <= 1
        owners = store_path.parent / "owners"
        assert [p.name for p in owners.iterdir()] == [f"{os.getpid()}.lock"]
