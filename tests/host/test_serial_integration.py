"""The host's serial path on a real pty served by the simulator."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import numpy as np
import pytest

from devicebridge.clock import SystemClock
from devicebridge.device.session import MassagerSession
from devicebridge.device.transport.serial import SerialTransport
from devicebridge.errors import DeviceNotFoundError, TransportError
from protocols import Ack, Command, GetInfo, MassageMode, TelemetryBatch, encode_frame
from simulators import SimulatedMassager, SimulatedWorld, VirtualClock
from simulators.links.serial_port import PtySerialPort

from .conftest import SEED, drain, gaps, sequences

RATE_HZ = 100

HANG_GUARD_S = 30.0  # a safety net against hangs; results never depend on it


@pytest.fixture
async def served(
    world: SimulatedWorld, clock: VirtualClock
) -> AsyncIterator[tuple[SimulatedMassager, PtySerialPort]]:
    massager = world.add_massager()
    async with world:
        port = PtySerialPort(massager)
        await port.start()
        clock.start()
        try:
            yield massager, port
        finally:
            await port.stop()


def serial_session(port: PtySerialPort, clock: VirtualClock) -> MassagerSession:
    """A session as the app makes one for a serial port: its waits on the wall clock, since
    the device on the line runs on its own time (here, the fast virtual clock: a pty's
    bytes take wall time that virtual time would otherwise overtake on a busy machine)."""
    del clock
    wall = SystemClock()
    return MassagerSession(
        SerialTransport(port.path, wall), wall, rng=random.Random(SEED), name="serial massager"
    )


async def test_stream_over_a_real_pty_gets_every_sample(
    served: tuple[SimulatedMassager, PtySerialPort], clock: VirtualClock
) -> None:
    massager, port = served
    session = serial_session(port, clock)
    subscription = session.telemetry()
    await session.start()
    info = session.device_info
    assert info.serial_number == massager.serial_number
    assert info.firmware_revision == massager.profile.firmware_revision
    assert info.profile == massager.profile
    await session.set_mode(MassageMode.PULSE)
    await clock.sleep(60.15)
    # The last frames may still be in the pty's buffers when virtual time gets there
    # (real I/O on a loaded machine): wait for a minute of samples, then take the rest.
    items = []
    async with asyncio.timeout(HANG_GUARD_S):
        while sum(len(i) for i in items if isinstance(i, TelemetryBatch)) < 60 * RATE_HZ:
            items.append(await anext(subscription))
    items += drain(subscription)
    seqs = sequences(items)
    assert gaps(items) == []
    assert seqs.size >= 60 * RATE_HZ
    np.testing.assert_array_equal(seqs, np.arange(seqs[0], seqs[0] + seqs.size))
    assert session.stats.malformed == 0
    assert session.battery_percent == massager.battery_percent
    await session.close()


async def test_malformed_frames_are_counted_and_the_stream_goes_on(
    served: tuple[SimulatedMassager, PtySerialPort], clock: VirtualClock
) -> None:
    massager, port = served
    session = serial_session(port, clock)
    subscription = session.telemetry()
    await session.start()
    await clock.sleep(1.0)
    good = encode_frame(Ack(1, 1, 0).encode())
    corrupted = bytearray(good)
    corrupted[2] ^= 0xFF  # CRC mismatch
    injected = [
        b"\x13\x37garbage without a delimiter\x00",
        bytes(corrupted),
        encode_frame(b"\x7f\x00\x00"),  # a valid frame carrying an unknown message type
        encode_frame(Command.of(9, GetInfo()).encode()),  # a command: not for the host
    ]
    for chunk in injected:
        # Test-side fault injection straight into the pty's master side.
        port._write(chunk)
        await clock.sleep(0.35)
    await clock.sleep(1.0)
    # Samples may still be in the pty when the clock stops here: wait until the host has
    # everything the device produced so far (real time only bounds a hang).
    produced = massager.next_sequence
    items: list[object] = []
    async with asyncio.timeout(HANG_GUARD_S):
        async for item in subscription:
            items.append(item)
            if isinstance(item, TelemetryBatch) and item.end_sequence >= produced:
                break
    stats = session.stats
    assert stats.malformed == 3  # garbage, CRC, unknown type
    assert stats.unexpected == 1
    seqs = sequences(items)
    np.testing.assert_array_equal(seqs, np.arange(seqs[0], seqs[0] + seqs.size))
    assert seqs.size >= 2.5 * RATE_HZ
    assert isinstance(items[-1], TelemetryBatch)
    await session.set_intensity(2)  # commands still work
    await session.close()


async def test_missing_port_is_not_found(clock: VirtualClock) -> None:
    clock.start()
    transport = SerialTransport("/dev/does-not-exist-devicebridge", clock)
    with pytest.raises(DeviceNotFoundError, match="does-not-exist"):
        await transport.wait_for_device(timeout_s=1.0)
    with pytest.raises(TransportError, match="does-not-exist"):
        await transport.connect()
    await clock.stop()


async def test_frames_written_while_the_line_is_full_go_out_whole_and_in_order() -> None:
    import os
    import tty

    from protocols import FrameDecoder

    controller, line = os.openpty()
    tty.setraw(line)  # a line, not a terminal: bytes as they are
    transport = SerialTransport(os.ttyname(line), SystemClock())
    try:
        await transport.connect()
        # Nobody reads the other end: the kernel's buffer fills and the rest waits.
        messages = [bytes([index % 256]) * 200 for index in range(2000)]
        for message in messages:
            transport.write_control_nowait(message)
        os.set_blocking(controller, False)
        decoder, received = FrameDecoder(), []
        async with asyncio.timeout(HANG_GUARD_S):
            while len(received) < len(messages):
                try:
                    chunk = os.read(controller, 65536)
                except BlockingIOError:
                    await asyncio.sleep(0)  # the transport finishes when writable again
                    continue
                frames, errors = decoder.feed(chunk)
                assert errors == []
                received += frames
        assert received == messages
    finally:
        await transport.disconnect()
        os.close(controller)
        os.close(line)
