"""SequenceTracker and the telemetry reassembler (pure cores)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from devicebridge.core.reassembly import GapReason, TelemetryGap, TelemetryReassembler
from devicebridge.core.sequencing import (
    SEQUENCE_MODULUS,
    SequenceRange,
    SequenceStatus,
    SequenceTracker,
    unwrap_sequence,
)
from protocols import MASSAGER_SAMPLE_DTYPE, SampleFormat, TelemetryBatch

RATE_HZ = 100


def batch(first: int, count: int, *, backfill: bool = False) -> TelemetryBatch:
    samples = np.zeros(count, dtype=MASSAGER_SAMPLE_DTYPE)
    # Mark each sample with its own sequence so reordering bugs show up in the data too.
    samples["pressure_dapa"] = np.arange(first, first + count) % 65536
    return TelemetryBatch(
        SampleFormat.MASSAGER_V1, first % SEQUENCE_MODULUS, first * 10, samples, backfill
    )


def test_tracker_classifies_batches() -> None:
    tracker = SequenceTracker()
    assert tracker.feed(100, 10).status is SequenceStatus.FIRST
    assert tracker.feed(110, 10).status is SequenceStatus.CONTIGUOUS
    gap = tracker.feed(150, 10)
    assert gap.status is SequenceStatus.GAP
    assert gap.missing == SequenceRange(120, 150)
    dup = tracker.feed(150, 10)
    assert (dup.status, dup.trim_samples, dup.new_samples) == (SequenceStatus.DUPLICATE, 10, 0)
    overlap = tracker.feed(155, 10)
    assert (overlap.status, overlap.trim_samples) == (SequenceStatus.OVERLAP, 5)
    assert tracker.next_expected == 165


def test_tracker_unwraps_past_u32() -> None:
    tracker = SequenceTracker()
    tracker.feed(SEQUENCE_MODULUS - 10, 10)
    verdict = tracker.feed(0, 10)
    assert verdict.status is SequenceStatus.CONTIGUOUS
    assert verdict.first_sequence == SEQUENCE_MODULUS
    gap = tracker.feed(5 + 10, 10)
    assert gap.missing == SequenceRange(SEQUENCE_MODULUS + 10, SEQUENCE_MODULUS + 15)


@given(
    st.integers(min_value=0, max_value=2**40), st.integers(min_value=-(2**31), max_value=2**31 - 1)
)
def test_unwrap_recovers_nearby_counters(reference: int, offset: int) -> None:
    value = max(0, reference + offset)
    if abs(value - reference) < 2**31:
        assert unwrap_sequence(value % SEQUENCE_MODULUS, reference) == value


def sequences_of(items: list[TelemetryBatch | TelemetryGap]) -> list[int]:
    out: list[int] = []
    for item in items:
        if isinstance(item, TelemetryBatch):
            out += [int(s) for s in item.sequences]
            assert list(item.samples["pressure_dapa"]) == [s % 65536 for s in item.sequences]
        else:
            out += list(range(item.first_sequence, item.end_sequence))
    return out


def test_backfill_fills_a_gap_and_live_batches_are_held_until_it_completes() -> None:
    r = TelemetryReassembler(sample_rate_hz=RATE_HZ)
    out = r.on_live(batch(0, 10)) + r.on_live(batch(10, 10))
    out += r.on_live(batch(40, 10))  # 20..40 missing
    assert r.held_samples == 10
    assert r.next_request() == SequenceRange(20, 40)
    assert r.next_request() is None  # asked once
    out += r.on_live(batch(50, 10))
    out += r.on_backfill_reply(20, 20, available=True)
    out += r.on_backfill(batch(20, 10, backfill=True))
    assert r.backfill_pending
    out += r.on_backfill(batch(30, 10, backfill=True))
    assert not r.backfill_pending
    assert sequences_of(out) == list(range(60))
    assert r.counters.backfilled_samples == 20
    assert r.held_samples == 0


def test_range_partly_gone_from_the_device_is_reported_as_a_gap() -> None:
    r = TelemetryReassembler()
    out = r.on_live(batch(0, 10)) + r.on_live(batch(100, 10))
    assert r.next_request() == SequenceRange(10, 100)
    # The device no longer holds 10..60: it sends 60..100.
    out += r.on_backfill(batch(60, 20, backfill=True))  # overtakes the reply: kept
    out += r.on_backfill_reply(60, 40, available=True)
    out += r.on_backfill(batch(80, 20, backfill=True))
    gaps = [i for i in out if isinstance(i, TelemetryGap)]
    assert gaps == [TelemetryGap(10, 50, GapReason.NOT_HELD_BY_DEVICE)]
    assert sequences_of(out) == list(range(110))


def test_unavailable_range_and_abandon_give_gaps_and_the_stream_goes_on() -> None:
    r = TelemetryReassembler()
    out = r.on_live(batch(0, 10)) + r.on_live(batch(20, 10)) + r.on_live(batch(40, 10))
    assert r.next_request() == SequenceRange(10, 20)
    out += r.on_backfill_reply(30, 0, available=False)
    assert r.next_request() == SequenceRange(30, 40)
    out += r.abandon_active()
    assert [type(i).__name__ for i in out].count("TelemetryGap") == 2
    assert sequences_of(out) == list(range(50))
    assert r.counters.lost_samples == 20


def test_link_reset_re_requests_the_remainder() -> None:
    r = TelemetryReassembler()
    out = r.on_live(batch(0, 10)) + r.on_live(batch(30, 10))
    assert r.next_request() == SequenceRange(10, 30)
    out += r.on_backfill_reply(10, 20, available=True)
    out += r.on_backfill(batch(10, 5, backfill=True))
    r.on_link_reset()
    assert r.next_request() == SequenceRange(15, 30)
    out += r.on_backfill_reply(15, 15, available=True)
    out += r.on_backfill(batch(15, 15, backfill=True))
    assert sequences_of(out) == list(range(40))


def test_stray_backfill_and_duplicates_are_dropped() -> None:
    r = TelemetryReassembler()
    out = r.on_live(batch(0, 10))
    out += r.on_backfill(batch(0, 10, backfill=True))
    out += r.on_live(batch(0, 10))
    assert sequences_of(out) == list(range(10))
    assert r.counters.stray_backfill_batches == 1
    assert r.counters.duplicates_dropped == 1


def test_holding_too_much_abandons_the_backfill() -> None:
    r = TelemetryReassembler(max_held_samples=25)
    out = r.on_live(batch(0, 10)) + r.on_live(batch(20, 10)) + r.on_live(batch(30, 10))
    assert r.backfill_pending
    out += r.on_live(batch(40, 10))
    assert not r.backfill_pending
    assert sequences_of(out) == list(range(50))


@settings(max_examples=150, deadline=None)
@given(
    start=st.sampled_from([0, 5, SEQUENCE_MODULUS - 57]),
    batch_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=40),
    dropped=st.sets(st.integers(0, 39)),
    duplicated=st.sets(st.integers(0, 39)),
    ring_samples=st.integers(5, 400),
)
def test_every_sample_exactly_once_in_order_or_reported_lost(
    start: int, batch_sizes: list[int], dropped: set[int], duplicated: set[int], ring_samples: int
) -> None:
    """Model a device with a ring buffer; the output always covers the stream exactly."""
    r = TelemetryReassembler()
    out: list[TelemetryBatch | TelemetryGap] = []
    seq = start
    for index, size in enumerate(batch_sizes):
        if index == 0 or index not in dropped:
            out += r.on_live(batch(seq, size))
            if index in duplicated:
                out += r.on_live(batch(seq, size))
        seq += size
        # The device answers immediately from its ring of the newest ring_samples.
        while (request := r.next_request()) is not None:
            oldest = max(start, seq - ring_samples)
            first = max(request.first, oldest)
            count = max(0, request.end - first)
            out += r.on_backfill_reply(first % SEQUENCE_MODULUS, count, available=count > 0)
            pos = first
            while pos < request.end:
                step = min(7, request.end - pos)
                out += r.on_backfill(batch(pos, step, backfill=True))
                pos += step
    covered = sequences_of(out)
    assert covered == list(range(start, start + len(covered)))
    assert r.counters.delivered_samples + r.counters.lost_samples == len(covered)


def test_a_stalled_backfill_can_be_asked_again_for_what_is_missing() -> None:
    reassembler = TelemetryReassembler(sample_rate_hz=100)
    samples = np.zeros(10, dtype=MASSAGER_SAMPLE_DTYPE)
    reassembler.on_live(TelemetryBatch(SampleFormat.MASSAGER_V1, 0, 0, samples))
    reassembler.on_live(TelemetryBatch(SampleFormat.MASSAGER_V1, 30, 300, samples))
    request = reassembler.next_request()
    assert (request.first, request.end) == (10, 30)  # type: ignore[union-attr]
    assert reassembler.next_request() is None  # asked once
    reassembler.on_backfill_reply(10, 20, available=True)
    reassembler.on_backfill(
        TelemetryBatch(SampleFormat.MASSAGER_V1, 10, 100, samples, backfill=True)
    )
    # The batch with 20..29 was lost on the way: ask again for exactly what is missing.
    assert reassembler.retry_active()
    again = reassembler.next_request()
    assert (again.first, again.end) == (20, 30)  # type: ignore[union-attr]
    reassembler.on_backfill_reply(20, 10, available=True)
    items = reassembler.on_backfill(
        TelemetryBatch(SampleFormat.MASSAGER_V1, 20, 200, samples, backfill=True)
    )
    delivered = [item.first_sequence for item in items]
    assert delivered == [20, 30]
    assert reassembler.counters.lost_samples == 0
