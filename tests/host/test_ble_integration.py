"""The host over the real bleak API against the simulator's bleak backend."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from devicebridge.core.reassembly import GapReason
from devicebridge.core.states import ConnectionState
from devicebridge.device.session import MaskSession, MassagerSession
from devicebridge.device.transport.ble import BleTransport, find_device, scan
from devicebridge.errors import (
    CommandRejectedError,
    CommandTimeoutError,
    DeviceNotFoundError,
    NotConnectedError,
)
from protocols import EventCode, MassageMode, Opcode, ResultCode, SetZone, Zone
from simulators import SimulatedWorld, VirtualClock

from .conftest import backends, ble_session, drain, gaps, sequences

RATE_HZ = 100
STREAM_S = 60.0


@pytest.mark.both_link_modes
async def test_discover_connect_all_read_info_and_stream_every_sample(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    devices = [world.add_massager(), world.add_massager(), world.add_mask(sample_rate_hz=RATE_HZ)]
    async with world:
        clock.start()
        found = await scan(clock, 1.0, world.scanner_backend)
        assert {d.serial_number for d in found} == {d.serial_number for d in devices}
        by_serial = {d.serial_number: d for d in devices}
        sessions = [ble_session(world, d) for d in found]
        subscriptions = [s.telemetry() for s in sessions]
        await asyncio.gather(*(s.start() for s in sessions))  # all three at once
        assert all(d.is_connected for d in devices)
        for session in sessions:
            info = session.device_info
            device = by_serial[info.serial_number]
            assert info.model_number == device.profile.model_number
            assert info.firmware_revision == device.profile.firmware_revision
            assert info.hardware_revision == device.profile.hardware_revision
            assert info.manufacturer_name == device.profile.manufacturer_name
            assert info.battery_percent == device.battery_percent
            assert info.profile == device.profile
        assert isinstance(sessions[0], MassagerSession | MaskSession)

        # One batch interval more, so the batch that closes the 60th second is in.
        await clock.sleep(STREAM_S + 0.15)
        for session, subscription in zip(sessions, subscriptions, strict=True):
            items = drain(subscription)
            seqs = sequences(items)
            device = by_serial[session.device_info.serial_number]
            assert gaps(items) == []
            assert seqs.size >= STREAM_S * RATE_HZ
            np.testing.assert_array_equal(seqs, np.arange(seqs[0], seqs[0] + seqs.size))
            # Nothing left behind: the last sample is at most one batch old.
            assert device.next_sequence - int(seqs[-1]) <= RATE_HZ // 10 + 1
            assert session.stats.gaps == 0
            assert session.stats.malformed == 0
        for session in sessions:
            await session.close()
        assert not any(d.is_connected for d in devices)


@pytest.mark.both_link_modes
async def test_link_loss_reconnects_and_backfills_every_sample_once_in_order(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
        session = ble_session(world, found)
        subscription = session.telemetry()
        await session.start()
        await clock.sleep(5.0)
        world.drop_link(massager, out_of_range_s=2.0)
        assert session.state is ConnectionState.RECONNECT_WAIT
        await clock.sleep(1.0)
        assert session.state is not ConnectionState.READY  # still out of range
        await session.wait_ready(timeout_s=10.0)
        await clock.sleep(5.0)  # backfill completes, live stream continues

        items = drain(subscription)
        seqs = sequences(items)
        np.testing.assert_array_equal(seqs, np.arange(seqs[0], seqs[0] + seqs.size))
        assert gaps(items) == []
        stats = session.stats
        assert stats.reconnects == 1
        assert stats.gaps == 1
        assert stats.backfilled_samples >= 2.0 * RATE_HZ  # the out-of-range time at least
        assert stats.lost_samples == 0
        history = session.state_history
        assert ConnectionState.WAITING_FOR_DEVICE in history
        assert history[-1] is ConnectionState.READY
        assert massager.next_sequence - int(seqs[-1]) <= RATE_HZ // 10 + 1
        await session.close()


@pytest.mark.both_link_modes
async def test_outage_longer_than_the_ring_gives_a_gap_record_and_the_stream_goes_on(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(ring_duration_s=1.0)
    async with world:
        clock.start()
        found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
        session = ble_session(world, found)
        subscription = session.telemetry()
        await session.start()
        await clock.sleep(2.0)
        world.drop_link(massager, out_of_range_s=3.0)
        await session.wait_ready(timeout_s=10.0)
        await clock.sleep(3.0)
        items = drain(subscription)
        lost = gaps(items)
        assert len(lost) == 1
        assert lost[0].reason is GapReason.NOT_HELD_BY_DEVICE
        # Delivered samples and the gap together cover the stream exactly once, in order.
        cursor = items[0].first_sequence
        for item in items:
            assert item.first_sequence == cursor
            cursor = item.end_sequence
        assert session.stats.lost_samples == lost[0].sample_count
        assert session.stats.backfilled_samples > 0  # what the ring still held
        await session.close()


async def test_commands_are_acknowledged_rejected_or_time_out_on_the_virtual_clock(
    world: SimulatedWorld, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    massager = world.add_massager()
    world.add_mask()
    async with world:
        clock.start()
        found = await scan(clock, 1.0, world.scanner_backend)
        sessions = {d.kind_label: ble_session(world, d, command_timeout_s=2.0) for d in found}
        massager_session = sessions["massager"]
        mask_session = sessions["led_mask"]
        assert isinstance(massager_session, MassagerSession)
        assert isinstance(mask_session, MaskSession)
        mask_events = mask_session.events()
        await asyncio.gather(massager_session.start(), mask_session.start())

        await massager_session.set_mode(MassageMode.VIBRATION)
        await massager_session.set_intensity(7)
        await massager_session.set_zone(Zone.CHEEK_LEFT)
        await mask_session.start_led(30.0, 20.0, 0.0, duration_s=5)
        await mask_session.stop_led()
        await mask_session.stop_all()
        await clock.sleep(0.2)
        codes = []
        while mask_events.pending():
            codes.append((await anext(mask_events)).code)
        assert EventCode.TREATMENT_STARTED in codes
        assert EventCode.TREATMENT_FINISHED in codes

        with pytest.raises(CommandRejectedError) as rejected:
            await mask_session.send(SetZone(Zone.FOREHEAD))
        assert rejected.value.result is ResultCode.NOT_SUPPORTED
        assert rejected.value.opcode is Opcode.SET_ZONE

        # A device that stops answering: the command times out after 2 virtual s.
        monkeypatch.setattr(massager, "receive", lambda channel, data: None)
        started_s = clock.now_s()
        with pytest.raises(CommandTimeoutError) as timed_out:
            await massager_session.set_intensity(3)
        assert timed_out.value.timeout_s == 2.0
        assert clock.now_s() - started_s == pytest.approx(2.0, abs=0.01)
        assert massager_session.stats.command_timeouts == 1
        for session in sessions.values():
            await session.close()
        with pytest.raises(Exception, match="closed"):
            await massager_session.stop_all()


async def test_unknown_device_is_not_found_within_the_timeout(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    world.add_massager()
    async with world:
        clock.start()
        transport = BleTransport(clock, serial_number="NOPE", backends=backends(world))
        with pytest.raises(DeviceNotFoundError, match="NOPE"):
            await transport.wait_for_device(timeout_s=1.5)
        with pytest.raises(NotConnectedError):
            await transport.write_control(b"\x01")
