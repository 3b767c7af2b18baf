"""Compaction in a process of its own, once telemetry pauses: the writer defers it while
devices stream (at most ``COMPACT_WAIT_S``), the child answers a sync once the jobs before
it are done, skips what it cannot read, never creates a store, and a killed child is
replaced at the next compaction."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from devicebridge.storage import compactor as compactor_module
from devicebridge.storage import writer as writer_module
from devicebridge.storage.compactor import COMPACTOR, serve
from devicebridge.storage.sessions import SessionStore
from devicebridge.storage.writer import COMPACT_IDLE_S, COMPACT_WAIT_S, StoreWriter

from .test_compressed_samples import chunk_rows, open_session, sensor_like
from .writer_jobs import append_samples_job, nothing_job, open_session_job


class Clock:
    """The writer's wall seconds, moved by the test."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(writer_module, "_now_s", clock)
    return clock


def raw_chunks(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM telemetry_chunks WHERE encoding = 0").fetchone()
    return int(count)


async def stream_and_finish(writer: StoreWriter, session: int) -> None:
    """Two batches of ``session`` through the writer's flush, then its record finished."""
    samples = sensor_like(200, seed=5)
    writer.add_samples(session, 0, samples[:100])
    writer.add_samples(session, 100, samples[100:])
    writer._submit()  # the flush that would follow: it notes that telemetry flowed
    writer.finish_session(session, status="completed", end_reason=None, summary={}).result(
        timeout=10
    )


def compactions_done(writer: StoreWriter) -> None:
    """Every job queued on the compactor so far is done (without asking for more)."""
    writer.run_now(nothing_job)  # the records finished so far are stored
    COMPACTOR.sync()


def look_again(writer: StoreWriter) -> None:
    """The writer's next look at the telemetry, now (it was due later)."""
    check = writer._idle_check
    assert check is not None
    check._run()
    compactions_done(writer)


def with_a_finished_session(
    path: Path, then: Callable[[StoreWriter, SessionStore, int], None]
) -> None:
    """A session streamed through a writer and finished, then ``then``, on a loop."""

    async def scenario() -> None:
        with SessionStore(path) as store:
            writer = StoreWriter(store)
            session = writer.submit(open_session_job).result(timeout=10)
            await stream_and_finish(writer, session)
            then(writer, store, session)
            if not writer._closing:
                writer.close()

    asyncio.run(scenario())


def test_a_session_waits_while_telemetry_streams_and_is_compacted_once_it_pauses(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "s.sqlite3"

    def then(writer: StoreWriter, _store: SessionStore, _session: int) -> None:
        clock.now_s += COMPACT_IDLE_S / 2
        look_again(writer)  # too soon after the last telemetry: nothing yet
        assert raw_chunks(path) > 0
        clock.now_s += COMPACT_IDLE_S
        look_again(writer)
        assert raw_chunks(path) == 0
        assert chunk_rows(path) == [(0, 200, 1)]

    with_a_finished_session(path, then)


def test_devices_that_never_pause_still_get_compacted_after_the_longest_wait(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "s.sqlite3"

    def then(writer: StoreWriter, _store: SessionStore, _session: int) -> None:
        ended_s = clock.now_s
        while clock.now_s < ended_s + COMPACT_WAIT_S:
            assert raw_chunks(path) > 0
            clock.now_s += COMPACT_IDLE_S / 2
            writer._streamed_at_s = clock.now_s  # another device streamed just now
            look_again(writer)
        assert raw_chunks(path) == 0

    with_a_finished_session(path, then)


def test_closing_the_writer_compacts_what_is_waiting(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "s.sqlite3"

    def then(writer: StoreWriter, store: SessionStore, session: int) -> None:
        writer.close()  # before any pause: the compaction is not left behind
        assert raw_chunks(path) == 0
        assert store.telemetry(session)[1].tobytes() == sensor_like(200, seed=5).tobytes()

    with_a_finished_session(path, then)


def test_the_child_answers_syncs_in_order_and_skips_what_it_cannot_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone" / "s.sqlite3"
    jobs = io.BytesIO(
        b"not json\n"
        + json.dumps({"compact": [str(missing), [1, 2]]}).encode()
        + b"\n"
        + json.dumps({"compact": "no"}).encode()
        + b"\n"
        + json.dumps({"sync": 7}).encode()
        + b"\n"
    )
    answers = io.BytesIO()
    with caplog.at_level(logging.ERROR, logger="devicebridge.storage.compactor"):
        serve(jobs, answers)
    assert answers.getvalue() == b'{"synced": 7}\n'
    assert not missing.parent.exists()  # a store that went away is never created
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "is gone" in messages[1]


def sessions_with(writer: StoreWriter, samples: np.ndarray, *, count: int) -> list[int]:
    """``count`` sessions stored through ``writer``, each holding ``samples``."""
    sessions = []
    for _ in range(count):
        session = writer.submit(open_session_job).result(timeout=10)
        writer.run_now(append_samples_job, session, 0, samples)
        sessions.append(session)
    return sessions


def test_a_killed_compactor_is_replaced_at_the_next_compaction(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    samples = sensor_like(300, seed=2)
    with SessionStore(path) as store:
        writer = StoreWriter(store)
        sessions = sessions_with(writer, samples, count=2)
        writer.finish_session(sessions[0], status="completed", end_reason=None, summary={})
        writer.wait_compacted()
        first = COMPACTOR.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(first, 0)
        writer.finish_session(sessions[1], status="completed", end_reason=None, summary={})
        writer.wait_compacted()
        assert COMPACTOR.pid not in (None, first)
        writer.close()
        assert raw_chunks(path) == 0
        for session in sessions:
            assert np.array_equal(store.telemetry(session)[1], samples)


def test_many_finished_sessions_go_in_jobs_of_a_bounded_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compactor_module, "SESSIONS_PER_JOB", 2)
    path = tmp_path / "s.sqlite3"
    samples = sensor_like(120, seed=4)
    with SessionStore(path) as store:
        writer = StoreWriter(store)
        sessions = sessions_with(writer, samples, count=5)
        for session in sessions:
            writer.finish_session(session, status="completed", end_reason=None, summary={})
        writer.close()  # five sessions: three job lines
        assert raw_chunks(path) == 0
        for session in sessions:
            assert np.array_equal(store.telemetry(session)[1], samples)


def test_the_child_loads_what_a_compaction_uses_before_its_first_job(tmp_path: Path) -> None:
    # A run's end waits for its compaction: a module loaded then (numpy: a tenth of a
    # second) would be waited for too.
    path = tmp_path / "s.sqlite3"
    with SessionStore(path) as store:
        session = open_session(store)
        samples = sensor_like(300, seed=3)
        for first in range(0, 300, 100):
            store.append_samples(session, first, samples[first : first + 100])
    probe = (
        "import importlib, json, sys\n"
        "from pathlib import Path\n"
        "from devicebridge.storage import compactor\n"
        "for module in compactor._JOB_MODULES:\n"
        "    importlib.import_module(module)\n"
        "before = set(sys.modules)\n"
        f"compactor._compact(Path({str(path)!r}), [{session}])\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []
    assert raw_chunks(path) == 0  # it compacted
