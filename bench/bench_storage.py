"""How much disk a stored session takes: 20 minutes of one massager at 200 Hz.

The samples come from the simulator (a hand moving over the face for 20 minutes in virtual
time: noisy pressure, drifting skin temperature, zone changes), so they compress as a
sensor's would, not as a constant array would. They are stored the way a session's writer
stores them (a chunk per ``FLUSH_INTERVAL_S`` of samples, one commit each), in two files:

* ``old format``: a store of schema version 2 (raw chunks), as devicebridge wrote it
  before compressed storage;
* ``compacted``: a store of this version after the session ended
  (:meth:`SessionStore.compact_telemetry`: compressed chunks of field planes).

Each file holds only that session, checkpointed and vacuumed; its size is what the
session costs on disk. Target (issue 15): under 1 MB for the 20 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np

from bench.report import describe_machine, print_table
from devicebridge.device.session import MassagerSession
from devicebridge.device.transport.ble import BleBackends, BleTransport
from devicebridge.storage.sessions import _MIGRATIONS, SessionStore
from devicebridge.storage.sqlite import connect, migrate
from devicebridge.storage.writer import FLUSH_INTERVAL_S
from protocols import SampleFormat, TelemetryBatch, Zone
from simulators import HandScript, HandSegment, SimulatedWorld, VirtualClock

RATE_HZ: Final = 200
SESSION_S: Final = 20 * 60
TARGET_MB: Final = 1.0
MB: Final = 1e6
OLD_SCHEMA_VERSION: Final = 2
SEED: Final = 15
ZONES: Final = (Zone.CHEEK_LEFT, Zone.CHEEK_RIGHT, Zone.FOREHEAD, Zone.JAWLINE_LEFT, Zone.CHIN)


def _hand(rng: random.Random) -> HandScript:
    segments, start_s = [], 1.0
    while start_s < SESSION_S + 60:
        duration_s = rng.uniform(20, 60)
        segments.append(
            HandSegment(
                start_s, duration_s, rng.choice(ZONES), rng.uniform(4, 9), rng.uniform(4, 12)
            )
        )
        start_s += duration_s + rng.uniform(1, 4)
    return HandScript(segments)


async def _samples() -> np.ndarray:
    """SESSION_S of one simulated massager at RATE_HZ, as the host received them."""
    clock = VirtualClock()
    world = SimulatedWorld(seed=SEED, clock=clock)
    device = world.add_massager(hand=_hand(random.Random(SEED)), sample_rate_hz=RATE_HZ)
    parts: list[np.ndarray] = []
    async with world:
        transport = BleTransport(
            clock,
            serial_number=device.serial_number,
            address=device.address,
            backends=BleBackends(world.scanner_backend, world.client_backend),
        )
        session = MassagerSession(transport, clock, rng=random.Random(SEED))
        session.observe_telemetry(
            lambda item: parts.append(item.samples) if isinstance(item, TelemetryBatch) else None
        )
        starting = asyncio.ensure_future(session.start())
        await clock.run_until(starting.done, 30.0)
        await starting
        await clock.advance(SESSION_S)
        await session.close()
    return np.concatenate(parts)[: SESSION_S * RATE_HZ]


def _chunks(samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
    per_chunk = round(FLUSH_INTERVAL_S * RATE_HZ)
    return [
        (first, samples[first : first + per_chunk]) for first in range(0, len(samples), per_chunk)
    ]


def _old_store(path: Path, samples: np.ndarray) -> None:
    """Schema version 2 and the rows its code wrote: one raw chunk per commit."""
    db = connect(path)
    migrate(db, _MIGRATIONS[:OLD_SCHEMA_VERSION])
    db.execute(
        "INSERT INTO sessions (routine_name, category, device_serial, device_kind,"
        " sample_format, sample_rate_hz, started_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            "bench",
            "bench",
            "SN",
            "massager",
            int(SampleFormat.MASSAGER_V1),
            RATE_HZ,
            datetime.now(UTC).isoformat(),
            "completed",
        ),
    )
    for first, chunk in _chunks(samples):
        db.execute(
            "INSERT OR IGNORE INTO telemetry_chunks"
            " (session_id, first_sequence, sample_count, received_at, samples)"
            " VALUES (?, ?, ?, ?, ?)",
            (1, first, len(chunk), datetime.now(UTC).isoformat(), chunk.tobytes()),
        )
    db.close()


def _new_store(path: Path, samples: np.ndarray) -> tuple[int, float]:
    """This version's store: the session written raw as it runs, then compacted."""
    with SessionStore(path) as store:
        session = store.start_session(
            routine_name="bench",
            category="bench",
            device_serial="SN",
            device_kind="massager",
            sample_format=SampleFormat.MASSAGER_V1,
            sample_rate_hz=RATE_HZ,
        )
        for first, chunk in _chunks(samples):
            store.append_samples(session, first, chunk)
        store.finish_session(session, status="completed", end_reason=None, summary={})
        started = time.perf_counter()
        chunks = store.compact_telemetry(session)
        return chunks, time.perf_counter() - started


def _on_disk(path: Path) -> tuple[int, int, int]:
    """(file bytes after a checkpoint and VACUUM, sample bytes in chunks, chunks)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        blob_bytes, chunks = db.execute(
            "SELECT SUM(LENGTH(samples)), COUNT(*) FROM telemetry_chunks"
        ).fetchone()
    return path.stat().st_size, int(blob_bytes), int(chunks)


def _read_s(path: Path) -> tuple[float, np.ndarray]:
    with SessionStore(path) as store:
        started = time.perf_counter()
        _, samples = store.telemetry(1)
        return time.perf_counter() - started, samples


def run() -> bool:
    samples = asyncio.run(_samples())
    count = len(samples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old, new = Path(tmp) / "old.sqlite3", Path(tmp) / "new.sqlite3"
        _old_store(old, samples)
        chunks, compact_s = _new_store(new, samples)
        sizes = {name: _on_disk(path) for name, path in (("old", old), ("new", new))}
        old_read_s, old_samples = _read_s(old)
        new_read_s, new_samples = _read_s(new)
    same = old_samples.tobytes() == new_samples.tobytes() == samples.tobytes()
    old_bytes = sizes["old"][0]
    for label, (file_bytes, blob_bytes, stored_chunks), read_s, extra in (
        ("old format (schema 2: raw chunks)", sizes["old"], old_read_s, "-"),
        ("compacted (planes + zlib)", sizes["new"], new_read_s, f"{compact_s:.2f}"),
    ):
        rows.append(
            (
                label,
                stored_chunks,
                file_bytes / count,
                blob_bytes / count,
                file_bytes / MB,
                f"{file_bytes / old_bytes:.2f}",
                f"{read_s * 1000:.0f}",
                extra,
                "met" if file_bytes / MB < TARGET_MB else "MISSED",
            )
        )
    print_table(
        f"stored session: {SESSION_S // 60} min of one massager at {RATE_HZ} Hz ({count:,} "
        f"samples of {samples.dtype.itemsize} bytes), file size after VACUUM; target < "
        f"{TARGET_MB:g} MB",
        [
            "format",
            "chunks",
            "file bytes/sample",
            "sample bytes/sample",
            "MB",
            "x old",
            "read ms",
            "compact s",
            "< 1 MB",
        ],
        rows,
    )
    print(f"  {chunks} compressed chunks; read back identical to what was stored: {same}")
    print(describe_machine())
    passed = same and sizes["new"][0] / MB < TARGET_MB
    print(f"storage target {'met' if passed else 'MISSED'}")
    return passed


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
