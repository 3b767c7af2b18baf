"""Fixtures for the simulator tests: a fast virtual clock and a recording link."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocols import (
    Ack,
    AnyMessage,
    Command,
    CommandBody,
    Event,
    StartStream,
    TelemetryBatch,
    decode_message,
)
from simulators import Channel, SimulatedDevice, SimulatedWorld, VirtualClock

SEED = 1234


class RecordingLink:
    """A DeviceLink that keeps everything the device sends."""

    def __init__(self, max_payload_bytes: int = 244) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.messages: list[tuple[Channel, bytes]] = []
        self.closed = False

    def send(self, channel: Channel, message: bytes) -> None:
        self.messages.append((channel, message))

    def device_closed(self) -> None:
        self.closed = True

    def decoded(self, channel: Channel) -> list[AnyMessage]:
        return [decode_message(m) for c, m in self.messages if c is channel]

    def acks(self) -> list[Ack]:
        return [m for m in self.decoded(Channel.CONTROL) if isinstance(m, Ack)]

    def events(self) -> list[Event]:
        return [m for m in self.decoded(Channel.EVENTS) if isinstance(m, Event)]

    def batches(self, *, backfill: bool | None = None) -> list[TelemetryBatch]:
        found = [m for m in self.decoded(Channel.TELEMETRY) if isinstance(m, TelemetryBatch)]
        return [b for b in found if backfill is None or b.backfill == backfill]

    def clear(self) -> None:
        self.messages.clear()


class Commander:
    """Sends commands to a device over a RecordingLink and returns the ack."""

    def __init__(self, device: SimulatedDevice, link: RecordingLink) -> None:
        self.device = device
        self.link = link
        self.next_id = 1

    def raw(self, data: bytes) -> Ack | None:
        before = len(self.link.acks())
        self.device.receive(Channel.CONTROL, data)
        acks = self.link.acks()
        return acks[-1] if len(acks) > before else None

    def __call__(self, body: CommandBody) -> Ack:
        command_id = self.next_id
        self.next_id += 1
        ack = self.raw(Command.of(command_id, body).encode())
        assert ack is not None
        assert ack.command_id == command_id
        assert ack.opcode == body.opcode
        return ack


def streaming(device: SimulatedDevice) -> tuple[RecordingLink, Commander]:
    """A recording link attached to ``device``, which streams to it (START_STREAM acked)."""
    link = RecordingLink()
    device.attach_link(link)
    command = Commander(device, link)
    command(StartStream())
    return link, command


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def world(clock: VirtualClock) -> AsyncIterator[SimulatedWorld]:
    world = SimulatedWorld(seed=SEED, clock=clock)
    async with world:
        yield world
