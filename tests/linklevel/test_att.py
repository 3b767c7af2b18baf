"""What only a real ATT bearer shows: MTU exchange and cutting, long writes."""

from __future__ import annotations

import pytest
from bleak import BleakClient
from bleak.exc import BleakError

from protocols import (
    CONTROL_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    Ack,
    Command,
    GetInfo,
    Opcode,
    ResultCode,
    StartStream,
    TelemetryBatch,
    decode_message,
)
from protocols.telemetry import max_samples_per_batch
from simulators import Channel, SimulatedDevice, VirtualClock
from simulators.linklevel import LinkLevelWorld

from .conftest import within_safety

ATT_DEFAULT_MTU = 23
REQUESTED_MTU = 247


class Inbox:
    """Notifications of one characteristic, and a way to wait for the next ones."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.values: list[bytes] = []

    def __call__(self, _char: object, data: bytearray) -> None:
        self.values.append(bytes(data))

    async def wait_for(self, count: int, max_virtual_s: float = 5.0) -> list[bytes]:
        waited_s = 0.0
        while len(self.values) < count and waited_s < max_virtual_s:
            await self.clock.sleep(0.1)
            waited_s += 0.1
        assert len(self.values) >= count, f"{len(self.values)} of {count} notifications"
        return self.values


def record_writes(
    monkeypatch: pytest.MonkeyPatch, device: SimulatedDevice
) -> list[tuple[Channel, bytes]]:
    """Every write the firmware receives (still passed on to it)."""
    received: list[tuple[Channel, bytes]] = []
    original = device.receive

    def receive(channel: Channel, data: bytes) -> None:
        received.append((channel, bytes(data)))
        original(channel, data)

    monkeypatch.setattr(device, "receive", receive)
    return received


async def test_mtu_exchange_from_23_to_247_and_notifications_cut_before_it(
    world: LinkLevelWorld, clock: VirtualClock
) -> None:
    # Batches every 0.5 s hold 50 samples: more than one notification carries.
    massager = world.add_massager(batch_interval_s=0.5)
    async with world:
        clock.start()
        client = BleakClient(massager.address, backend=world.client_backend, request_mtu=None)
        await within_safety(client.connect())
        assert client.mtu_size == ATT_DEFAULT_MTU
        await client.pair()  # Control needs an encrypted link
        acks, telemetry = Inbox(clock), Inbox(clock)
        await client.start_notify(CONTROL_CHAR_UUID, acks)
        await client.start_notify(TELEMETRY_CHAR_UUID, telemetry)

        get_info = Command.of(1, GetInfo()).encode()
        full_ack = Ack(1, Opcode.GET_INFO, ResultCode.OK, massager.profile.encode()).encode()
        assert len(full_ack) > ATT_DEFAULT_MTU - 3
        await client.write_gatt_char(CONTROL_CHAR_UUID, get_info, response=True)
        await client.write_gatt_char(
            CONTROL_CHAR_UUID, Command.of(2, StartStream()).encode(), response=True
        )
        (cut_ack, *_) = await acks.wait_for(2)
        # On the wire the ack is cut to MTU - 3 = 20 bytes (bumble's server cuts it).
        assert cut_ack == full_ack[: ATT_DEFAULT_MTU - 3]
        # The firmware sizes telemetry to the link: one 19-byte sample per notification.
        before = await telemetry.wait_for(3)
        batches = [decode_message(value) for value in before]
        assert all(isinstance(b, TelemetryBatch) and len(b) == 1 for b in batches)
        assert all(len(value) <= ATT_DEFAULT_MTU - 3 for value in before)

        backend = world.client_of(massager)
        assert backend is not None
        assert await backend.exchange_mtu(REQUESTED_MTU) == REQUESTED_MTU
        assert client.mtu_size == REQUESTED_MTU
        acks.values.clear()
        telemetry.values.clear()
        await client.write_gatt_char(CONTROL_CHAR_UUID, get_info, response=True)
        (whole_ack,) = await acks.wait_for(1)
        assert whole_ack == full_ack
        after = await telemetry.wait_for(4)
        per_batch = max_samples_per_batch(massager.sample_format, REQUESTED_MTU - 3)
        assert per_batch == 26  # docs/protocol.md 4.3
        lengths = [len(decode_message(value)) for value in after]  # type: ignore[arg-type]
        assert max(lengths) == per_batch
        assert all(len(value) <= REQUESTED_MTU - 3 for value in after)
        await client.disconnect()


async def test_a_write_longer_than_the_mtu_is_a_long_write_delivered_whole(
    world: LinkLevelWorld, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        writes = record_writes(monkeypatch, massager)
        client = BleakClient(massager.address, backend=world.client_backend, request_mtu=None)
        await within_safety(client.connect())
        await client.pair()
        server = world.peripheral_of(massager).bumble
        assert server is not None
        prepared: list[int] = []
        on_prepare = server.gatt_server.on_att_prepare_write_request

        def count_prepare(bearer: object, request: object) -> None:
            prepared.append(1)
            on_prepare(bearer, request)  # type: ignore[arg-type]

        monkeypatch.setattr(server.gatt_server, "on_att_prepare_write_request", count_prepare)
        # A command with 300 bytes of parameters: far more than one 23-byte ATT PDU.
        long_command = Command(7, Opcode.PING, bytes(range(256)) + bytes(44)).encode()
        await client.write_gatt_char(CONTROL_CHAR_UUID, long_command, response=True)
        assert writes == [(Channel.CONTROL, long_command)]
        # Prepare Write Requests of MTU - 5 = 18 bytes each, then one Execute Write.
        assert len(prepared) == -(-len(long_command) // (ATT_DEFAULT_MTU - 5))

        # Without response there is no long procedure: the stack refuses locally.
        with pytest.raises(BleakError, match="max_write_without_response_size"):
            await client.write_gatt_char(CONTROL_CHAR_UUID, long_command, response=False)
        await client.disconnect()
