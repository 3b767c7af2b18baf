"""A device that restarts while the host is away: every sample delivered or counted as lost.

A restart loses the device's RAM ring: what the old boot took after the last sample the
host received is gone (a gap with reason device_rebooted, exact when the BOOT reports how
far the old boot counted); what the new boot took before the host heard from it is in
the new ring and is backfilled from sequence 0.
"""

from __future__ import annotations

import numpy as np

from devicebridge.core.reassembly import (
    GapReason,
    TelemetryGap,
    TelemetryItem,
    TelemetryReassembler,
)
from devicebridge.core.sequencing import SequenceRange
from devicebridge.device.session import DeviceSession
from devicebridge.device.transport.ble import find_device
from protocols import MASSAGER_SAMPLE_DTYPE, SampleFormat, TelemetryBatch
from simulators import SimulatedMassager, SimulatedWorld, VirtualClock
from simulators.faults.injector import FaultInjector
from simulators.faults.spec import make_fault

from .conftest import SEED, ble_session, drain

RATE_HZ = 100
BATCH = RATE_HZ // 10  # samples of one live tick


def split_at_restart(
    items: list[TelemetryItem], reason: GapReason = GapReason.DEVICE_REBOOTED
) -> tuple[list[TelemetryItem], TelemetryGap, list[TelemetryItem]]:
    """(old boot's items, the restart's gap, new boot's items)."""
    (index,) = [
        i
        for i, item in enumerate(items)
        if isinstance(item, TelemetryGap) and item.reason is reason
    ]
    gap = items[index]
    assert isinstance(gap, TelemetryGap)
    return items[:index], gap, items[index + 1 :]


def contiguous(items: list[TelemetryItem]) -> tuple[int, int]:
    """``(first, end)`` of batches that follow each other without a hole."""
    assert items
    assert all(isinstance(item, TelemetryBatch) for item in items), items
    cursor = items[0].first_sequence
    for item in items:
        assert item.first_sequence == cursor
        cursor = item.end_sequence
    return items[0].first_sequence, cursor


async def start_streaming(world: SimulatedWorld, clock: VirtualClock) -> DeviceSession:
    clock.start()
    found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
    session = ble_session(world, found)
    await session.start()
    return session


async def reboot_while_away(
    world: SimulatedWorld, clock: VirtualClock, massager: SimulatedMassager, kind: str
) -> tuple[DeviceSession, list[TelemetryItem], int]:
    """Stream, walk out of range, ``kind`` (reboot, brownout) there, come back; returns the
    session, what it delivered, and how many samples the old boot had taken."""
    session = await start_streaming(world, clock)
    subscription = session.telemetry()
    await clock.sleep(3.0)
    injector = FaultInjector(massager, seed=SEED, world=world).install()
    injector.start()
    injector.add(make_fault(kind, at_s=clock.now_s() + 1.0, down_s=0.5))
    world.drop_link(massager, out_of_range_s=3.0)
    await clock.sleep(1.5)
    assert injector.reboots == 1
    await session.wait_ready(timeout_s=20.0)
    await clock.sleep(5.0)  # the new boot's samples are backfilled, the live stream goes on
    ((_, old_end),) = injector.held_before_reboot
    return session, drain(subscription), old_end


async def test_a_reboot_while_away_counts_the_old_boots_lost_samples_exactly(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        session, items, old_end = await reboot_while_away(world, clock, massager, "reboot")
        before, gap, after = split_at_restart(items)
        _, received_end = contiguous(before)
        # The samples taken while the host was away died with the RAM: counted, exactly.
        assert old_end - received_end >= RATE_HZ  # a second out of range before the reboot
        assert (gap.first_sequence, gap.sample_count) == (received_end, old_end - received_end)
        assert gap.count_known
        # The new boot is delivered from its first sample: the part taken before the host
        # reconnected came by backfill from the new ring.
        first, end = contiguous(after)
        assert first == 0
        assert massager.next_sequence - end <= BATCH + 1
        stats = session.stats
        assert stats.device_restarts == 1
        assert stats.lost_samples == old_end - received_end
        assert stats.backfilled_samples >= RATE_HZ  # the new boot's first seconds
        await session.close()


async def test_a_brownout_while_away_marks_an_uncounted_loss(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    # A brown-out clears the RAM that knew the old count: the device cannot say it, and
    # the host does not invent a number.
    massager = world.add_massager()
    async with world:
        session, items, _ = await reboot_while_away(world, clock, massager, "brownout")
        before, gap, after = split_at_restart(items)
        _, received_end = contiguous(before)
        assert (gap.first_sequence, gap.sample_count) == (received_end, 0)
        assert not gap.count_known
        assert contiguous(after)[0] == 0
        assert session.stats.device_restarts == 1
        await session.close()


async def test_a_reboot_on_a_live_link_loses_nothing_and_counts_once(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        session = await start_streaming(world, clock)
        subscription = session.telemetry()
        await clock.sleep(2.0)
        injector = FaultInjector(massager, seed=SEED, world=world).install()
        injector.start()
        injector.add(make_fault("reboot", at_s=clock.now_s() + 1.0, down_s=0.5))
        await clock.sleep(1.5)
        await session.wait_ready(timeout_s=20.0)
        await clock.sleep(3.0)
        before, gap, after = split_at_restart(drain(subscription))
        ((_, old_end),) = injector.held_before_reboot
        # The firmware sent what it held before it went: nothing of the old boot is lost.
        assert contiguous(before)[1] == old_end
        assert (gap.first_sequence, gap.sample_count, gap.count_known) == (old_end, 0, True)
        assert contiguous(after)[0] == 0
        # The BOOT event and the counter that went back are one restart.
        assert session.stats.device_restarts == 1
        assert session.stats.lost_samples == 0
        await session.close()


async def test_a_power_cycle_counts_what_the_shutdown_left_unsent(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        session = await start_streaming(world, clock)
        subscription = session.telemetry()
        await clock.sleep(2.05)  # half a tick after the last batch went out
        massager.shutdown()  # a long press: SHUTDOWN, then the radio goes off
        end_at_shutdown = massager.next_sequence
        await clock.sleep(2.0)
        await massager.stop()
        massager.start()  # pressed again
        await session.wait_ready(timeout_s=20.0)
        await clock.sleep(3.0)
        before, gap, after = split_at_restart(drain(subscription), GapReason.DEVICE_SHUT_DOWN)
        _, received_end = contiguous(before)
        assert received_end < end_at_shutdown  # the last half tick never went out
        assert (gap.first_sequence, gap.end_sequence) == (received_end, end_at_shutdown)
        assert gap.count_known
        assert contiguous(after)[0] == 0
        # SHUTDOWN and the BOOT after it are one power cycle, counted once.
        assert session.stats.device_restarts == 1
        assert session.stats.lost_samples == end_at_shutdown - received_end
        assert all(
            item.sample_format is SampleFormat.MASSAGER_V1
            for item in after
            if isinstance(item, TelemetryBatch)
        )
        await session.close()


# --------------------------------------------------------------------------- the pure part


def batch(first: int, count: int = 10) -> TelemetryBatch:
    samples = np.zeros(count, dtype=MASSAGER_SAMPLE_DTYPE)
    return TelemetryBatch(SampleFormat.MASSAGER_V1, first % 2**32, 0, samples)


def gap_tuples(items: list[TelemetryItem]) -> list[tuple[int, int, GapReason, bool]]:
    return [
        (i.first_sequence, i.sample_count, i.reason, i.count_known)
        for i in items
        if isinstance(i, TelemetryGap)
    ]


def streaming(first: int = 0, end: int = 20) -> TelemetryReassembler:
    reassembler = TelemetryReassembler(sample_rate_hz=RATE_HZ)
    for start in range(first, end, 10):
        reassembler.on_live(batch(start))
    return reassembler


def test_a_reported_restart_counts_the_old_boot_and_backfills_the_new_one() -> None:
    reassembler = streaming()
    items = reassembler.on_device_restart(GapReason.DEVICE_REBOOTED, sequence_end=35)
    assert gap_tuples(items) == [(20, 15, GapReason.DEVICE_REBOOTED, True)]
    assert reassembler.on_live(batch(50)) == []  # held: 0..49 of the new boot are missing
    assert reassembler.next_request() == SequenceRange(0, 50)
    assert reassembler.counters.device_restarts == 1
    assert reassembler.counters.lost_samples == 15


def test_an_unreported_restart_is_marked_uncounted() -> None:
    reassembler = streaming()
    items = reassembler.on_device_restart(GapReason.DEVICE_REBOOTED)
    assert gap_tuples(items) == [(20, 0, GapReason.DEVICE_REBOOTED, False)]


def test_a_shutdown_and_the_boot_after_it_are_one_power_cycle() -> None:
    reassembler = streaming()
    shutdown = reassembler.on_device_restart(GapReason.DEVICE_SHUT_DOWN, sequence_end=25)
    assert gap_tuples(shutdown) == [(20, 5, GapReason.DEVICE_SHUT_DOWN, True)]
    assert reassembler.on_device_restart(GapReason.DEVICE_REBOOTED, sequence_end=25) == []
    later = reassembler.on_device_restart(GapReason.DEVICE_REBOOTED, sequence_end=27)
    assert gap_tuples(later) == [(25, 2, GapReason.DEVICE_SHUT_DOWN, True)]
    assert reassembler.counters.device_restarts == 1


def test_a_shutdown_right_after_a_boot_is_a_restart_of_the_new_boot() -> None:
    reassembler = streaming()
    reassembler.on_device_restart(GapReason.DEVICE_REBOOTED, sequence_end=20)
    again = reassembler.on_device_restart(GapReason.DEVICE_SHUT_DOWN, sequence_end=7)
    assert gap_tuples(again) == [(0, 7, GapReason.DEVICE_SHUT_DOWN, True)]
    assert reassembler.counters.device_restarts == 2


def test_a_reported_count_is_unwrapped_like_the_sequences() -> None:
    reassembler = streaming(2**32 - 10, 2**32 + 10)
    items = reassembler.on_device_restart(GapReason.DEVICE_REBOOTED, sequence_end=15)
    assert gap_tuples(items) == [(2**32 + 10, 5, GapReason.DEVICE_REBOOTED, True)]
    # A count below what was received is no count of that boot.
    odd = streaming().on_device_restart(GapReason.DEVICE_REBOOTED, sequence_end=5)
    assert gap_tuples(odd) == [(20, 0, GapReason.DEVICE_REBOOTED, False)]
