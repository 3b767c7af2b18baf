"""REQUEST_BACKFILL from the ring: full, partial and unavailable ranges."""

from __future__ import annotations

import numpy as np

from protocols import BackfillReply, RequestBackfill, ResultCode, StartStream, TelemetryBatch
from simulators import Channel, SimulatedWorld, VirtualClock

from .conftest import Commander, RecordingLink


def joined(batches: list[TelemetryBatch]) -> tuple[int, np.ndarray]:
    expected = batches[0].first_sequence
    for batch in batches:
        assert batch.first_sequence == expected
        expected = batch.end_sequence
    return batches[0].first_sequence, np.concatenate([b.samples for b in batches])


async def test_backfill_resends_ring_samples_after_the_ack(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    await clock.advance(5.0)
    link = RecordingLink()
    massager.attach_link(link)
    command = Commander(massager, link)
    ack = command(RequestBackfill(100, 300))
    assert ack.result == ResultCode.OK
    assert BackfillReply.decode(ack.payload) == BackfillReply(100, 300)
    assert link.batches() == []  # paced: nothing before the next tick
    await clock.run_until(lambda: massager.backfill_pending_samples == 0, max_virtual_s=5.0)
    batches = link.batches(backfill=True)
    assert all(b.backfill for b in link.batches())
    first, samples = joined(batches)
    assert first == 100
    assert samples.shape[0] == 300
    _, expected = massager.ring.range(100, 300)
    assert np.array_equal(samples, expected)
    assert all(len(b.encode()) <= link.max_payload_bytes for b in batches)
    assert batches[0].device_time_ms == 1000  # sequence 100 at 100 Hz


async def test_backfill_interleaves_with_live_stream_and_is_paced(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(ring_duration_s=120.0)
    await clock.advance(60.0)
    link = RecordingLink()
    massager.attach_link(link)
    command = Commander(massager, link)
    command(StartStream())
    ack = command(RequestBackfill(0, 6000))
    assert BackfillReply.decode(ack.payload) == BackfillReply(0, 6000)
    await clock.advance(0.1)
    first_tick = link.batches(backfill=True)
    assert 0 < sum(len(b) for b in first_tick) < 6000  # limited by link throughput
    assert link.batches(backfill=False)  # live data keeps flowing meanwhile
    assert await clock.run_until(lambda: massager.backfill_pending_samples == 0, 10.0)
    first, samples = joined(link.batches(backfill=True))
    assert (first, samples.shape[0]) == (0, 6000)


async def test_partial_backfill_starts_at_the_oldest_held(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(ring_duration_s=2.0)  # 200 samples
    await clock.advance(5.0)  # 500 taken: 300..499 held
    assert massager.ring.oldest_sequence == 300
    link = RecordingLink()
    massager.attach_link(link)
    command = Commander(massager, link)
    ack = command(RequestBackfill(250, 100))
    assert ack.result == ResultCode.OK
    assert BackfillReply.decode(ack.payload) == BackfillReply(300, 50)
    # Reaching past the newest sample: clipped to what is taken.
    ack = command(RequestBackfill(480, 1000))
    assert BackfillReply.decode(ack.payload) == BackfillReply(480, 20)
    await clock.advance(0.1)
    counts = [(b.first_sequence, len(b)) for b in link.batches(backfill=True)]
    assert counts == [(300, 26), (326, 24), (480, 20)]


async def test_unavailable_backfill(world: SimulatedWorld, clock: VirtualClock) -> None:
    massager = world.add_massager(ring_duration_s=2.0)
    await clock.advance(5.0)
    link = RecordingLink()
    massager.attach_link(link)
    command = Commander(massager, link)
    for request in (RequestBackfill(0, 100), RequestBackfill(10_000, 5)):
        ack = command(request)
        assert ack.result == ResultCode.DATA_UNAVAILABLE
        assert BackfillReply.decode(ack.payload) == BackfillReply(300, 0)
    assert command(RequestBackfill(300, 0)).result == ResultCode.INVALID_PARAMETER
    await clock.advance(0.5)
    assert link.batches() == []


async def test_disconnect_cancels_pending_backfill(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    await clock.advance(30.0)
    link = RecordingLink()
    massager.attach_link(link)
    Commander(massager, link)(RequestBackfill(0, 3000))
    massager.detach_link()
    assert massager.backfill_pending_samples == 0
    await clock.advance(1.0)
    assert not any(c is Channel.TELEMETRY for c, _ in link.messages)
