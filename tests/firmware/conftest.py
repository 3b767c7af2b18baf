"""Fixtures of the firmware tests: a simulated world on a fast virtual clock, and images."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devicebridge.device.transport.ble import BleBackends
from devicebridge.firmware import (
    BleSmpTransport,
    FirmwareImage,
    FirmwareUpdater,
    SmpBleLink,
    parse_image,
)
from simulators import SimulatedMassager, SimulatedWorld, VirtualClock
from simulators.smp import SmpFirmware, build_image

SEED = 6060
IMAGE_BODY_BYTES = 64 * 1024


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def world(clock: VirtualClock) -> AsyncIterator[SimulatedWorld]:
    world = SimulatedWorld(seed=SEED, clock=clock)
    world.add_massager()
    async with world:
        clock.start()
        yield world
        await clock.stop()


@pytest.fixture
def massager(world: SimulatedWorld) -> SimulatedMassager:
    device = world.devices[0]
    assert isinstance(device, SimulatedMassager)
    return device


@pytest.fixture
def firmware(world: SimulatedWorld, massager: SimulatedMassager) -> SmpFirmware:
    return world.smp_firmware(massager)


def new_image(version: str = "1.1.0", model: str = "OFC-FM1") -> FirmwareImage:
    return parse_image(build_image(version, model, body_bytes=IMAGE_BODY_BYTES), path="test.bin")


def ble_updater(world: SimulatedWorld, device: SimulatedMassager) -> FirmwareUpdater:
    """An updater over our BLE link, found by the serial number the device advertises."""
    link = SmpBleLink(
        world.clock,
        serial_number=device.serial_number,
        backends=BleBackends(world.scanner_backend, world.client_backend),
    )
    return FirmwareUpdater(BleSmpTransport(link, world.clock), world.clock, device=device.name)
