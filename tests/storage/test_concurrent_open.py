"""Two commands on one data directory at once (two `run`s, `serve` and `history`): a new
store's schema is created once, whoever opens it first, and none of them fails on the lock
another holds (the switch to WAL answered "database is locked" without waiting)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from devicebridge.storage.registry import DeviceRegistry
from devicebridge.storage.sessions import SessionStore

PROCESSES = 4
ROUNDS = 8


def _open_stores(data_dir: str, start: Any) -> None:
    start.wait(60)  # every process opens the new stores at the same instant
    DeviceRegistry(Path(data_dir) / "registry.sqlite3").close()
    SessionStore(Path(data_dir) / "sessions.sqlite3").close()


def test_stores_opened_by_several_processes_at_once_are_created_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for round_ in range(ROUNDS):
        data_dir = tmp_path / f"data-{round_}"
        start = context.Barrier(PROCESSES)
        processes = [
            context.Process(target=_open_stores, args=(str(data_dir), start))
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [p.exitcode for p in processes] == [0] * PROCESSES
        with SessionStore(data_dir / "sessions.sqlite3") as store:
            assert store.sessions() == []
