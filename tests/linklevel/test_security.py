"""The encrypted characteristic: refused before pairing, and the host pairs by itself."""

from __future__ import annotations

import random
from typing import Any

import pytest
from bleak import BleakClient
from bleak.exc import BleakGATTProtocolError, BleakGATTProtocolErrorCode

from devicebridge.device.session import MassagerSession
from devicebridge.device.transport.ble import BleBackends, BleTransport, find_device
from protocols import CONTROL_CHAR_UUID, DEVICE_PROFILE_CHAR_UUID, Command, DeviceProfile, Ping
from simulators import VirtualClock
from simulators.linklevel import LinkLevelBleakClient, LinkLevelWorld

from .conftest import SEED, within_safety


def count_pairings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Addresses the backend paired with (the real pairing still runs)."""
    paired: list[str] = []
    original = LinkLevelBleakClient.pair

    async def pair(self: LinkLevelBleakClient, *args: Any, **kwargs: Any) -> None:
        paired.append(self.peer_address)
        await original(self, *args, **kwargs)

    monkeypatch.setattr(LinkLevelBleakClient, "pair", pair)
    return paired


@pytest.fixture
def world(clock: VirtualClock) -> LinkLevelWorld:
    # The Control characteristic needs encryption by default; the Device Profile
    # too here, so that reading one fails before pairing as well.
    return LinkLevelWorld(
        seed=SEED,
        clock=clock,
        encrypted_uuids=frozenset({CONTROL_CHAR_UUID, DEVICE_PROFILE_CHAR_UUID}),
    )


async def test_reads_and_writes_fail_before_pairing_and_succeed_after(
    world: LinkLevelWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        client = BleakClient(massager.address, backend=world.client_backend)
        await within_safety(client.connect())
        ping = Command.of(1, Ping()).encode()
        with pytest.raises(BleakGATTProtocolError) as write_refused:
            await client.write_gatt_char(CONTROL_CHAR_UUID, ping, response=True)
        assert write_refused.value.code is BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION
        with pytest.raises(BleakGATTProtocolError) as read_refused:
            await client.read_gatt_char(DEVICE_PROFILE_CHAR_UUID)
        assert read_refused.value.code is BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION
        assert massager.commands_received == 0

        await client.pair()
        await client.write_gatt_char(CONTROL_CHAR_UUID, ping, response=True)
        assert massager.commands_received == 1
        profile = DeviceProfile.decode(bytes(await client.read_gatt_char(DEVICE_PROFILE_CHAR_UUID)))
        assert profile == massager.profile
        await client.disconnect()
        await client.unpair()


async def test_the_host_pairs_by_itself_once_and_the_bond_survives_a_reconnect(
    world: LinkLevelWorld, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    massager = world.add_massager()
    paired = count_pairings(monkeypatch)
    async with world:
        clock.start()
        found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
        transport = BleTransport(
            clock, device=found, backends=BleBackends(world.scanner_backend, world.client_backend)
        )
        session = MassagerSession(transport, clock, rng=random.Random(SEED))
        await within_safety(session.start())  # reads the profile, sends START_STREAM
        assert paired == [found.address]
        assert session.device_info.profile == massager.profile
        backend = world.client_of(massager)
        assert backend is not None
        assert backend.is_encrypted

        world.drop_link(massager, out_of_range_s=0.5)
        await within_safety(session.wait_ready(timeout_s=10.0))
        # Reconnected and encrypted with the stored key: no second pairing.
        assert paired == [found.address]
        backend = world.client_of(massager)
        assert backend is not None
        assert backend.is_encrypted
        await session.send(Ping())
        await session.close()
