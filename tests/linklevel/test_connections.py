"""Connects that wait for an advertisement, and disconnects from either side."""

from __future__ import annotations

import asyncio
import random

import numpy as np
from bleak import BleakClient

from devicebridge.core.states import ConnectionState
from devicebridge.device.session import MassagerSession
from devicebridge.device.transport.ble import BleBackends, BleTransport, find_device
from simulators import ShutdownReason, VirtualClock
from simulators.linklevel import LinkLevelWorld

from ..host.conftest import drain, gaps, sequences
from .conftest import SEED, within_safety


async def test_a_connect_waits_for_the_next_advertisement(
    world: LinkLevelWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        world.set_in_range(massager, False)  # silent: no advertisement
        await clock.sleep(0.3)  # the advertising tick has stopped the controller
        client = BleakClient(massager.address, backend=world.client_backend)
        connecting = asyncio.ensure_future(client.connect())
        await clock.sleep(2.0)
        assert not connecting.done()  # the controller is still listening for it
        assert not massager.is_connected
        world.set_in_range(massager, True)  # the next advertising tick starts advertising
        await within_safety(connecting)
        assert client.is_connected
        assert massager.is_connected
        await client.disconnect()


async def test_disconnects_from_either_side_reach_the_other(
    world: LinkLevelWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        lost = asyncio.Event()
        client = BleakClient(
            massager.address,
            backend=world.client_backend,
            disconnected_callback=lambda _: lost.set(),
        )
        # The host ends it: the device has seen the link go when disconnect returns.
        await within_safety(client.connect())
        await client.disconnect()
        assert not massager.is_connected
        assert lost.is_set()  # BlueZ calls back on every disconnect, ours too

        # The device ends it (an LL_TERMINATE_IND): the host hears it over the air.
        lost.clear()
        await within_safety(client.connect())
        world.disconnect_from_device(massager)
        assert not massager.is_connected
        await within_safety(lost.wait())
        assert not client.is_connected

        # The device powers off while connected.
        lost.clear()
        await within_safety(client.connect())
        massager.power_off(ShutdownReason.BUTTON)
        await within_safety(lost.wait())
        assert not client.is_connected


async def test_the_session_reconnects_after_the_device_hung_up_and_backfills_once(
    world: LinkLevelWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
        transport = BleTransport(
            clock, device=found, backends=BleBackends(world.scanner_backend, world.client_backend)
        )
        session = MassagerSession(transport, clock, rng=random.Random(SEED))
        subscription = session.telemetry()
        await within_safety(session.start())
        await clock.sleep(2.0)
        world.disconnect_from_device(massager)
        await within_safety(_until_left_ready(session, clock))
        await within_safety(session.wait_ready(timeout_s=10.0))
        await clock.sleep(2.0)
        items = drain(subscription)
        seqs = sequences(items)
        np.testing.assert_array_equal(seqs, np.arange(seqs[0], seqs[0] + seqs.size))
        assert gaps(items) == []
        assert session.stats.reconnects == 1
        assert session.stats.lost_samples == 0
        assert session.stats.backfilled_samples > 0  # what the reconnect backoff missed
        await session.close()


async def _until_left_ready(session: MassagerSession, clock: VirtualClock) -> None:
    # The disconnect reaches the host over the link, a few loop turns later.
    while session.state is ConnectionState.READY:
        await clock.sleep(0.01)
