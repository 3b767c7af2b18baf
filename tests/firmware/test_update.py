"""Firmware updates through the bridge: the real bleak API over the simulator, smpclient on top."""

from __future__ import annotations

import asyncio

import pytest

from devicebridge.device.transport.ble import BleBackends, BleTransport
from devicebridge.firmware import (
    FirmwareUpdater,
    SmpCommandError,
    UpdateOutcome,
    UploadProgress,
)
from devicebridge.firmware.connect import _UdpTransport, parse_udp_endpoint
from simulators import SimulatedMassager, SimulatedWorld
from simulators.smp import SmpFirmware, SmpUdpServer
from tests.firmware.conftest import ble_updater, new_image

OUT_OF_RANGE_S = 1.0
# Real-time safety net only: virtual time runs as fast as the CPU allows.
HANG_GUARD_S = 30.0


async def test_update_with_two_link_drops_completes_with_less_than_twice_the_bytes(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.1.0")
    drops_at: list[int] = []

    def drop_twice(offset: int) -> None:
        # Walk out of range at a third and at two thirds of the upload.
        if len(drops_at) < 2 and offset > (len(drops_at) + 1) * image.size_bytes // 3:
            drops_at.append(offset)
            asyncio.get_running_loop().call_soon(world.drop_link, massager, OUT_OF_RANGE_S)

    firmware.on_upload_write = drop_twice
    progress: list[UploadProgress] = []
    updater = ble_updater(world, massager)
    result = await asyncio.wait_for(
        updater.update(image, on_progress=progress.append), HANG_GUARD_S
    )
    await updater.close()

    assert result.outcome is UpdateOutcome.UPDATED
    assert (result.old_version, result.running_version) == ("1.0.0", "1.1.0")
    assert len(drops_at) == 2
    assert result.reconnects == 2
    # Each restart went on from the device's offset, not from zero.
    assert list(result.resumed_from_bytes) == drops_at
    assert [p.offset_bytes for p in progress if p.resumed] == drops_at
    assert result.wire_bytes_sent < 2 * image.size_bytes
    assert firmware.upload_bytes < 2 * image.size_bytes
    assert firmware.upload_resumes == 2
    # The device runs the new image, confirmed, and says so in its Device Information.
    assert firmware.primary.hash == image.hash
    assert firmware.primary.confirmed
    assert massager.firmware_revision == "1.1.0"
    transport = BleTransport(
        world.clock,
        serial_number=massager.serial_number,
        backends=BleBackends(world.scanner_backend, world.client_backend),
    )
    await transport.connect()
    assert (await transport.read_device_info()).firmware_revision == "1.1.0"
    await transport.disconnect()


async def test_a_new_image_that_does_not_boot_is_reported_and_never_confirmed(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    firmware.fails_new_image_boot = True
    image = new_image("1.2.0")
    updater = ble_updater(world, massager)
    result = await asyncio.wait_for(updater.update(image), HANG_GUARD_S)
    states = await updater.read_states()
    await updater.close()
    assert result.outcome is UpdateOutcome.REVERTED
    assert result.running_version == "1.0.0"
    assert result.new_version == "1.2.0"
    active = next(s for s in states if s.active)
    assert active.version == "1.0.0"
    assert active.confirmed
    kept = next(s for s in states if s.slot == 1)
    assert kept.hash == image.hash
    assert not kept.pending
    assert not kept.confirmed
    assert firmware.reverts == 1
    assert massager.firmware_revision == "1.0.0-sim"


async def test_tested_but_unconfirmed_image_reverts_at_the_next_reset(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.3.0")
    updater = ble_updater(world, massager)
    await asyncio.wait_for(updater.upload(image), HANG_GUARD_S)
    await updater.mark_for_test(image)
    trial = await asyncio.wait_for(updater.reset_and_wait(image), HANG_GUARD_S)
    running = next(s for s in trial if s.active)
    assert (running.version, running.confirmed) == ("1.3.0", False)
    # Nobody confirms: the next reset brings the old image back, and the bridge sees it.
    after = await asyncio.wait_for(updater.reset_and_wait(image), HANG_GUARD_S)
    await updater.close()
    running = next(s for s in after if s.active)
    assert (running.version, running.confirmed) == ("1.0.0", True)
    assert firmware.reverts == 1


async def test_an_interrupted_update_resumes_where_the_device_stopped(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.4.0")
    half = asyncio.Event()
    firmware.on_upload_write = lambda offset: half.set() if offset > image.size_bytes // 2 else None
    first = ble_updater(world, massager)
    task = asyncio.ensure_future(first.update(image))
    await asyncio.wait_for(half.wait(), HANG_GUARD_S)
    task.cancel()  # as Ctrl-C does
    with pytest.raises(asyncio.CancelledError):
        await task
    await first.close()
    kept = firmware.upload_offset
    assert kept is not None
    assert kept > image.size_bytes // 2

    second = ble_updater(world, massager)
    result = await asyncio.wait_for(second.update(image), HANG_GUARD_S)
    await second.close()
    assert result.outcome is UpdateOutcome.UPDATED
    assert result.resumed_from_bytes[0] == kept
    assert second.bytes_sent < image.size_bytes * 0.7


async def test_an_update_to_the_running_image_does_nothing(
    world: SimulatedWorld, massager: SimulatedMassager
) -> None:
    image = new_image("1.5.0")
    updater = ble_updater(world, massager)
    assert (await updater.update(image)).outcome is UpdateOutcome.UPDATED
    again = await updater.update(image)
    await updater.close()
    assert again.outcome is UpdateOutcome.ALREADY_RUNNING
    assert not again.uploaded


async def test_device_refusals_become_errors_that_name_the_result(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.6.0")
    updater = ble_updater(world, massager)
    await updater.upload(image)
    await updater.mark_for_test(image)
    # A second upload while an image is pending is refused by the device.
    with pytest.raises(SmpCommandError, match="IMAGE_ALREADY_PENDING"):
        await updater.upload(new_image("1.7.0"))
    await updater.close()


async def test_the_same_update_over_udp(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    server = SmpUdpServer(firmware, port=0)
    await server.start()
    try:
        host, port = parse_udp_endpoint(f"127.0.0.1:{server.port}")
        updater = FirmwareUpdater(
            _UdpTransport(port),
            world.clock,
            device=massager.name,
            address=host,
            # Requests sent while the device reboots get no answer: retry soon.
            request_timeout_s=0.2,
        )
        result = await asyncio.wait_for(updater.update(new_image("2.0.0")), HANG_GUARD_S)
        await updater.close()
    finally:
        await server.stop()
    assert result.outcome is UpdateOutcome.UPDATED
    assert firmware.running_version == "2.0.0"


def test_udp_endpoints_parse() -> None:
    assert parse_udp_endpoint("10.0.0.2") == ("10.0.0.2", 1337)
    assert parse_udp_endpoint("10.0.0.2:4000") == ("10.0.0.2", 4000)
    assert parse_udp_endpoint("[::1]:4000") == ("::1", 4000)
    with pytest.raises(ValueError, match="port"):
        parse_udp_endpoint("host:99999")
