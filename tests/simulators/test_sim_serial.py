"""Devices on real ptys, read by pyserial from the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import serial

from protocols import (
    Ack,
    Command,
    CommandBody,
    DeviceProfile,
    FrameDecoder,
    GetInfo,
    Ping,
    ResultCode,
    StartStream,
    TelemetryBatch,
    decode_message,
    encode_frame,
)
from simulators import SimulatedWorld, VirtualClock
from simulators.links.serial_port import PtySerialPort

FAILSAFE_S = 5.0  # only stops a hang; results never depend on wall time


class SerialHost:
    """A minimal host end: pyserial on the slave, non-blocking reads from the loop."""

    def __init__(self, path: str) -> None:
        self.port = serial.Serial(path, baudrate=115200, timeout=0)
        self.decoder = FrameDecoder()
        self.messages: list[object] = []
        self.errors = 0
        self.reading = False
        self.next_id = 1

    def start_reading(self) -> None:
        asyncio.get_running_loop().add_reader(self.port.fileno(), self._on_readable)
        self.reading = True

    def _on_readable(self) -> None:
        data = self.port.read(max(1, self.port.in_waiting))
        messages, errors = self.decoder.feed(data)
        self.errors += len(errors)
        self.messages.extend(decode_message(m) for m in messages)

    def send(self, body: CommandBody) -> int:
        command_id = self.next_id
        self.next_id += 1
        self.port.write(encode_frame(Command.of(command_id, body).encode()))
        return command_id

    def acks(self) -> list[Ack]:
        return [m for m in self.messages if isinstance(m, Ack)]

    def batches(self) -> list[TelemetryBatch]:
        return [m for m in self.messages if isinstance(m, TelemetryBatch)]

    def close(self) -> None:
        if self.reading:
            asyncio.get_running_loop().remove_reader(self.port.fileno())
        self.port.close()


async def eventually(predicate: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FAILSAFE_S
    while not predicate():
        assert loop.time() < deadline, "condition not reached (failsafe)"
        await asyncio.sleep(0.001)


def contiguous_count(batches: list[TelemetryBatch]) -> int:
    expected = batches[0].first_sequence
    for batch in batches:
        assert batch.first_sequence == expected
        expected = batch.end_sequence
    return expected - batches[0].first_sequence


async def test_frames_round_trip_on_several_ptys(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    devices = [world.add_massager(), world.add_massager(), world.add_mask()]
    ports = [PtySerialPort(d) for d in devices]
    hosts: list[SerialHost] = []
    try:
        for port in ports:
            await port.start()
            assert port.path.startswith("/dev/")
            host = SerialHost(port.path)
            host.start_reading()
            hosts.append(host)
        assert len({p.path for p in ports}) == 3
        for host in hosts:
            host.send(GetInfo())
            host.send(StartStream())
        await eventually(lambda: all(len(h.acks()) == 2 for h in hosts))
        for host, device in zip(hosts, devices, strict=True):
            info, stream = host.acks()
            assert (info.command_id, info.result) == (1, ResultCode.OK)
            assert DeviceProfile.decode(info.payload) == device.profile
            assert (stream.command_id, stream.result) == (2, ResultCode.OK)
        await clock.advance(10.0)
        await eventually(
            lambda: all(
                h.batches() and h.batches()[-1].end_sequence == d.next_sequence
                for h, d in zip(hosts, devices, strict=True)
            )
        )
        counts = [contiguous_count(h.batches()) for h in hosts]
        assert counts == [1000, 1000, 100]
        assert all(h.errors == 0 for h in hosts)
    finally:
        for host in hosts:
            host.close()
        for port in ports:
            await port.stop()
    assert not any(d.is_connected for d in devices)


async def test_garbage_on_the_line_is_counted_and_the_stream_resyncs(
    world: SimulatedWorld,
) -> None:
    device = world.add_massager()
    port = PtySerialPort(device)
    await port.start()
    host = SerialHost(port.path)
    host.start_reading()
    try:
        host.port.write(b"\x13\x37garbage\x00")
        host.port.write(encode_frame(b"\x20\x00"))  # a valid frame that is not a command
        host.send(Ping())
        await eventually(lambda: len(host.acks()) == 1)
        assert port.frame_errors == 1
        assert device.ignored_frames == 1
    finally:
        host.close()
        await port.stop()


async def test_a_full_pty_never_blocks_the_loop(world: SimulatedWorld, clock: VirtualClock) -> None:
    device = world.add_massager()
    port = PtySerialPort(device)
    await port.start()
    host = SerialHost(port.path)
    try:
        host.send(StartStream())
        await eventually(lambda: device.is_streaming)
        # Nobody reads for 60 virtual seconds: the pty fills, the port buffers.
        await clock.advance(60.0)
        assert port.buffered_bytes > 0
        host.start_reading()
        await eventually(
            lambda: bool(host.batches()) and host.batches()[-1].end_sequence == device.next_sequence
        )
        assert port.buffered_bytes == 0
        batches = host.batches()
        assert contiguous_count(batches) == device.next_sequence - batches[0].first_sequence
        assert batches[0].first_sequence <= 1
        samples = np.concatenate([b.samples for b in batches])
        assert samples.shape[0] >= 5999
    finally:
        host.close()
        await port.stop()
