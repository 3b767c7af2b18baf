"""The streaming path's building blocks: the telemetry batcher's raw-byte buffer and
grouped outbox appends (one transaction, ids in order, nothing half-stored)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from devicebridge.core.reassembly import GapReason, TelemetryGap
from devicebridge.errors import OutboxFullError
from devicebridge.service.publishing import Publisher
from devicebridge.service.telemetry import TelemetryBatcher, decode_telemetry_message
from devicebridge.storage.outbox import Outbox
from protocols import Event, EventCode, SampleFormat, TelemetryBatch
from protocols.telemetry import SAMPLE_DTYPES


def _batch(first_sequence: int, count: int) -> TelemetryBatch:
    dtype = SAMPLE_DTYPES[SampleFormat.MASSAGER_V1]
    raw = np.arange(first_sequence * dtype.itemsize, (first_sequence + count) * dtype.itemsize)
    samples = np.frombuffer((raw % 251).astype(np.uint8).tobytes(), dtype=dtype)
    return TelemetryBatch(SampleFormat.MASSAGER_V1, first_sequence, first_sequence * 10, samples)


def test_batcher_cuts_contiguous_messages_with_the_exact_sample_bytes() -> None:
    batcher = TelemetryBatcher("SN1", SampleFormat.MASSAGER_V1, 100.0, 1.0)
    batches = [_batch(first, 7) for first in range(0, 350, 7)]
    messages = [m for b in batches for m in batcher.add(b)]
    messages += batcher.flush()
    assert [(m["first_sequence"], m["count"]) for m in messages] == [
        (0, 100),
        (100, 100),
        (200, 100),
        (300, 50),
    ]
    assert [m["device_time_ms"] for m in messages] == [0, 1000, 2000, 3000]
    sent = np.concatenate([b.samples for b in batches])
    received = np.concatenate([decode_telemetry_message(m) for m in messages])
    assert received.tobytes() == sent.tobytes()
    assert batcher.samples_published == 350


def test_a_gap_ends_the_message_and_is_reported_in_the_next() -> None:
    batcher = TelemetryBatcher("SN1", SampleFormat.MASSAGER_V1, 100.0, 1.0)
    assert batcher.add(_batch(0, 30)) == []
    reason = next(iter(GapReason))
    cut = batcher.gap(TelemetryGap(30, 5, reason))
    assert [(m["first_sequence"], m["count"], m["gaps"]) for m in cut] == [(0, 30, [])]
    assert batcher.add(_batch(35, 100))[0]["gaps"] == [
        {"first_sequence": 30, "count": 5, "reason": reason.value}
    ]


def test_events_ride_in_the_next_message_in_order_or_alone_when_flushed() -> None:
    batcher = TelemetryBatcher("SN1", SampleFormat.MASSAGER_V1, 100.0, 1.0)
    assert batcher.add(_batch(0, 60)) == []
    batcher.event(Event(7, 450, EventCode.CONTACT_CHANGED, b"\x01"))
    batcher.event(Event(8, 590, EventCode.ZONE_CHANGED, b"\x03"))
    (first,) = batcher.add(_batch(60, 50))
    assert first["events"] == [
        {
            "code": "contact_changed",
            "event_sequence": 7,
            "device_time_ms": 450,
            "payload_hex": "01",
        },
        {"code": "zone_changed", "event_sequence": 8, "device_time_ms": 590, "payload_hex": "03"},
    ]
    # Carried once: the next message starts with none.
    assert batcher.flush()[0]["events"] == []
    # With no samples held (the link dropped), a flush sends the waiting events alone.
    assert batcher.flush() == []
    batcher.event(Event(9, 1200, 0x42, b""))
    (alone,) = batcher.flush()
    assert (alone["first_sequence"], alone["count"], alone["samples_b64"]) == (110, 0, "")
    assert alone["events"] == [
        {"code": 0x42, "event_sequence": 9, "device_time_ms": 1200, "payload_hex": ""}
    ]
    assert batcher.samples_published == 110


def test_grouped_appends_are_one_transaction_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", bridge_id="b")
    assert outbox.next_sequence() == 1
    sequences = outbox.append_many([("t/a", b"1", 1, False), ("t/b", b"2", 1, True)])
    assert sequences == [1, 2]
    assert outbox.append("t/c", b"3") == 3
    pending = outbox.pending()
    assert [(m.message_id, m.topic, m.payload, m.retain) for m in pending] == [
        ("b:1", "t/a", b"1", False),
        ("b:2", "t/b", b"2", True),
        ("b:3", "t/c", b"3", False),
    ]
    outbox.delivered(3)
    outbox.close()
    # Ids never go back, even with an empty outbox after a restart.
    reopened = Outbox(tmp_path / "o.sqlite3", bridge_id="b")
    assert len(reopened) == 0
    assert reopened.next_sequence() == 4
    assert reopened.append("t", b"x") == 4


def _outbox_of(path: Path, messages: int) -> tuple[Outbox, list[int]]:
    """An outbox at ``path`` holding ``messages`` stored messages, and their sequences."""
    outbox = Outbox(path, bridge_id="b")
    return outbox, outbox.append_many([(f"t/{n}", b"x", 1, False) for n in range(messages)])


def _stored_sequences(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT sequence FROM outbox ORDER BY sequence")]


def test_acknowledged_messages_leave_at_once_and_sqlite_with_the_next_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite3"
    outbox, first = _outbox_of(path, 4)
    outbox.delivered(first[1])
    outbox.delivered(first[0])  # an older acknowledgement changes nothing
    # Gone from what waits and from what the link is offered, not yet from SQLite.
    assert (len(outbox), [m.sequence for m in outbox.pending()]) == (2, first[2:])
    assert [m.sequence for m in outbox.pending_after(0, 10)] == first[2:]
    assert _stored_sequences(path) == first
    # A bridge killed now re-sends the acknowledged ones, with the same ids.
    killed = Outbox(path, bridge_id="b")
    assert [m.message_id for m in killed.pending()] == [f"b:{s}" for s in first]
    killed.close()
    # The next commit removes them in its transaction.
    (later,) = outbox.append_many([("t/late", b"y", 1, False)])
    assert _stored_sequences(path) == [*first[2:], later]
    outbox.delivered(later)
    assert len(outbox) == 0
    outbox.close()  # closing removes what was acknowledged since
    assert _stored_sequences(path) == []


def test_acknowledged_messages_are_read_back_the_same_from_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Too many to mirror in memory: the outbox reads SQLite, which still holds the
    # acknowledged ones until the next commit.
    path = tmp_path / "o.sqlite3"
    with monkeypatch.context() as patched:
        patched.setattr("devicebridge.storage.outbox.MIRROR_MAX_MESSAGES", 3)
        outbox, sequences = _outbox_of(path, 6)
    outbox.delivered(sequences[2])
    assert len(outbox) == 3
    assert [m.sequence for m in outbox.pending()] == sequences[3:]
    assert [m.sequence for m in outbox.pending_after(sequences[3], 10)] == sequences[4:]
    assert _stored_sequences(path) == sequences
    outbox.close()
    assert _stored_sequences(path) == sequences[3:]


def test_many_acknowledged_messages_are_removed_without_waiting_for_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("devicebridge.storage.outbox.MAX_UNPURGED_MESSAGES", 3)
    path = tmp_path / "o.sqlite3"
    outbox, sequences = _outbox_of(path, 5)
    stored = []
    for acknowledged in sequences[1:3]:  # the second leaves three waiting for their removal
        outbox.delivered(acknowledged)
        stored.append(_stored_sequences(path))
    assert stored == [sequences, sequences[3:]]
    outbox.close()


def test_a_group_that_does_not_fit_is_refused_whole(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", bridge_id="b", max_messages=3)
    outbox.append("t", b"x")
    with pytest.raises(OutboxFullError, match="limit 3"):
        outbox.append_many([("t", b"y", 1, False)] * 3)
    assert len(outbox) == 1
    assert outbox.next_sequence() == 2
    with contextlib.closing(sqlite3.connect(tmp_path / "o.sqlite3")) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (1,)


async def test_the_publisher_stores_a_group_of_messages_in_one_transaction(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", bridge_id="b")
    stored = asyncio.Event()
    publisher = Publisher(outbox, stored.set, group_s=0.0)
    for n in range(5):
        publisher.publish(f"t/{n}", {"n": n}, retain=n == 4)
    # Staged, with their ids, not yet stored nor offered to the link.
    assert (outbox.staged, len(outbox), outbox.pending()) == (5, 0, [])
    async with asyncio.timeout(10):
        await stored.wait()  # the group is stored on the loop, after the publishes
    assert (outbox.staged, len(outbox), outbox.commits) == (0, 5, 1)
    pending = outbox.pending()
    assert [json.loads(m.payload) for m in pending] == [
        {"message_id": f"b:{n + 1}", "n": n} for n in range(5)
    ]
    assert [m.retain for m in pending] == [False] * 4 + [True]
    publisher.publish("t/5", {"n": 5})
    publisher.flush()  # what the service does before it drains and closes the outbox
    assert (len(outbox), outbox.commits) == (6, 2)
    with contextlib.closing(sqlite3.connect(tmp_path / "o.sqlite3")) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (6,)


def test_closing_the_outbox_stores_what_is_staged(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", bridge_id="b")
    assert [outbox.stage("t", bytes([n])) for n in range(3)] == [1, 2, 3]
    outbox.close()
    reopened = Outbox(tmp_path / "o.sqlite3", bridge_id="b")
    assert [m.payload for m in reopened.pending()] == [b"\x00", b"\x01", b"\x02"]
    assert reopened.next_sequence() == 4
