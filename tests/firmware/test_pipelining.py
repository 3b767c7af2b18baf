"""The pipelined upload against the simulated Zephyr SMP server: requests in flight, buffers,
lost and late answers, link drops mid-pipeline, the reboot wait, and the slot-size refusal.

Everything runs on the fast virtual clock; times asserted are virtual seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable

import pytest

from devicebridge.firmware import (
    FirmwareUpdater,
    ImageTooLargeError,
    Phase,
    UpdateOutcome,
)
from devicebridge.firmware.connect import _UdpTransport
from devicebridge.firmware.updater import DEFAULT_REQUEST_TIMEOUT_S
from simulators import SimulatedMassager, SimulatedWorld
from simulators.smp import RequestSeen, SmpFirmware, SmpUdpServer
from simulators.smp.constants import Group, ImageCommand
from simulators.smp.firmware import BOOT_TIME_S, RESET_DELAY_S, SWAP_TIME_S
from tests.firmware.conftest import ble_updater, new_image

# Real-time safety net only: virtual time runs as fast as the CPU allows.
HANG_GUARD_S = 60.0
OUT_OF_RANGE_S = 1.0


def _upload_offset(seen: RequestSeen) -> int | None:
    if (seen.group, seen.command) != (Group.IMAGE, ImageCommand.UPLOAD):
        return None
    offset = seen.body.get("off")
    return offset if isinstance(offset, int) else None


def _lose_first_answer_at(offsets: Callable[[int], bool]) -> Callable[[RequestSeen], float | None]:
    """A reply fault: the first answer to an upload request at a chosen offset is lost."""
    lost: set[int] = set()

    def fate(seen: RequestSeen) -> float | None:
        offset = _upload_offset(seen)
        if offset is None or offset == 0 or not offsets(offset) or offset in lost:
            return None
        lost.add(offset)
        return math.inf

    return fate


@pytest.mark.parametrize("buf_count", [2, 4, 8])
async def test_the_device_sees_several_requests_in_flight_never_more_than_its_buffers(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware, buf_count: int
) -> None:
    firmware.buf_count = buf_count
    image = new_image("1.1.0")
    updater = ble_updater(world, massager)
    await asyncio.wait_for(updater.upload(image), HANG_GUARD_S)
    await updater.close()

    assert firmware.secondary is not None
    assert firmware.secondary.hash == image.hash
    # The device advertised its buffers, and the bridge kept one for the answer.
    assert updater.buffer_count == buf_count
    assert firmware.peak_requests_in_flight == buf_count - 1
    assert updater.last_upload is not None
    assert updater.last_upload.peak_in_flight == buf_count - 1
    assert firmware.peak_buffers_in_use <= buf_count
    assert firmware.dropped_requests == 0
    # Nothing was sent twice.
    assert firmware.upload_bytes == image.size_bytes


async def test_pipelining_keeps_a_slow_writing_device_busy_without_losing_a_request(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    # Flash slower than the link: requests wait in the device's buffers while it writes.
    firmware.flash_bytes_per_s = 40_000
    image = new_image("1.1.0")
    updater = ble_updater(world, massager)
    await asyncio.wait_for(updater.upload(image), HANG_GUARD_S)
    await updater.close()
    assert firmware.secondary is not None
    assert firmware.secondary.hash == image.hash
    assert firmware.peak_buffers_in_use == firmware.buf_count  # every buffer in use, none short
    assert firmware.dropped_requests == 0
    assert firmware.upload_bytes == image.size_bytes


async def test_a_lost_answer_mid_pipeline_costs_nothing(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.1.0")
    middle = image.size_bytes // 2
    hit: list[int] = []

    def lose_one(offset: int) -> bool:
        if not hit and offset >= middle:
            hit.append(offset)
            return True
        return False

    firmware.reply_delay_s = _lose_first_answer_at(lose_one)
    updater = ble_updater(world, massager)
    await asyncio.wait_for(updater.upload(image), HANG_GUARD_S)
    await updater.close()
    assert firmware.replies_lost == 1
    assert firmware.secondary is not None
    assert firmware.secondary.hash == image.hash
    # The next answer said where the device was: nothing resent, no timeout waited.
    assert updater.last_upload is not None
    assert updater.last_upload.answers_missed == 1
    assert updater.last_upload.timeouts == 0
    assert firmware.upload_bytes == image.size_bytes


async def test_every_answer_in_flight_lost_costs_one_timeout_and_no_restart(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.1.0")
    start = image.size_bytes // 3
    # Lose the answers to the requests in a stretch wider than the pipeline: the bridge
    # hears nothing back, times out once, and asks the device where it stands.
    firmware.reply_delay_s = _lose_first_answer_at(lambda offset: start <= offset < start + 9000)
    updater = ble_updater(world, massager)
    started_s = world.clock.now_s()
    await asyncio.wait_for(updater.upload(image), HANG_GUARD_S)
    elapsed_s = world.clock.now_s() - started_s
    await updater.close()

    stats = updater.last_upload
    assert stats is not None
    assert firmware.replies_lost >= updater.requests_in_flight_limit
    assert stats.timeouts == 1
    assert stats.resyncs == 1  # the device was ahead of what the bridge had heard
    assert updater.reconnects == 0
    assert firmware.upload_resumes == 0  # never started over
    assert firmware.secondary is not None
    assert firmware.secondary.hash == image.hash
    # Only the one probe's chunk went twice.
    chunk_bytes = updater.buffer_size
    assert chunk_bytes is not None
    assert image.size_bytes < firmware.upload_bytes < image.size_bytes + chunk_bytes
    assert elapsed_s < DEFAULT_REQUEST_TIMEOUT_S + 3.0


async def test_a_lost_last_answer_does_not_restart_the_upload(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.1.0")
    last_offsets: list[int] = []

    def fate(seen: RequestSeen) -> float | None:
        offset = _upload_offset(seen)
        if offset is None or firmware.upload_offset is not None or last_offsets:
            return None
        # This request completed the upload (no upload is in progress any more).
        last_offsets.append(offset)
        return math.inf

    firmware.reply_delay_s = fate
    updater = ble_updater(world, massager)
    result = await asyncio.wait_for(updater.update(image), HANG_GUARD_S)
    await updater.close()
    assert result.outcome is UpdateOutcome.UPDATED
    assert len(last_offsets) == 1
    # The bridge asked again with one chunk; the device said it had no upload in
    # progress; the slots showed the complete image: nothing more was sent.
    chunk_bytes = updater.buffer_size
    assert chunk_bytes is not None
    assert firmware.upload_bytes < image.size_bytes + chunk_bytes
    assert firmware.primary.hash == image.hash


async def test_late_answers_out_of_order_over_udp(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.1.0")
    delayed: list[int] = []

    def fate(seen: RequestSeen) -> float | None:
        offset = _upload_offset(seen)
        if offset and len(delayed) < 3 and offset > len(delayed) * 20_000:
            delayed.append(offset)
            return 0.5  # overtaken by the answers to the requests sent after it
        return None

    firmware.reply_delay_s = fate
    server = SmpUdpServer(firmware, port=0)
    await server.start()
    try:
        updater = FirmwareUpdater(
            _UdpTransport(server.port), world.clock, device=massager.name, address="127.0.0.1"
        )
        await asyncio.wait_for(updater.upload(image), HANG_GUARD_S)
        await updater.close()
    finally:
        await server.stop()
    assert len(delayed) == 3
    stats = updater.last_upload
    assert stats is not None
    assert stats.peak_in_flight == firmware.buf_count - 1
    assert stats.answers_missed == 3  # each overtaken, none waited for
    assert stats.timeouts == 0
    assert updater.channel.late_responses == 3  # and dropped when they came
    assert firmware.upload_bytes == image.size_bytes
    assert firmware.secondary is not None
    assert firmware.secondary.hash == image.hash


async def test_a_link_drop_mid_pipeline_resumes_from_the_offset_the_device_reports(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    image = new_image("1.2.0")
    in_flight_at_drop: list[int] = []
    offset_at_drop: list[int] = []

    def drop_once(offset: int) -> None:
        if not offset_at_drop and offset > image.size_bytes // 2:
            in_flight_at_drop.append(firmware.requests_in_flight)
            offset_at_drop.append(offset)
            asyncio.get_running_loop().call_soon(world.drop_link, massager, OUT_OF_RANGE_S)

    firmware.on_upload_write = drop_once
    updater = ble_updater(world, massager)
    result = await asyncio.wait_for(updater.update(image), HANG_GUARD_S)
    await updater.close()

    assert result.outcome is UpdateOutcome.UPDATED
    # Requests were on their way when the link went; they were lost with it.
    assert in_flight_at_drop[0] >= 2
    assert result.reconnects == 1
    assert list(result.resumed_from_bytes) == offset_at_drop
    assert firmware.upload_resumes == 1
    # What went twice is at most what was in flight, plus the resume request's chunk.
    chunk_bytes = updater.buffer_size
    assert chunk_bytes is not None
    assert firmware.upload_bytes <= image.size_bytes + (in_flight_at_drop[0] + 1) * chunk_bytes
    assert firmware.primary.hash == image.hash


@pytest.fixture
async def udp_server(firmware: SmpFirmware) -> AsyncIterator[SmpUdpServer]:
    server = SmpUdpServer(firmware, port=0)
    await server.start()
    yield server
    await server.stop()


async def test_the_reset_costs_the_reboot_and_no_fixed_wait(
    world: SimulatedWorld,
    massager: SimulatedMassager,
    firmware: SmpFirmware,
    udp_server: SmpUdpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Over UDP (as over a serial console) requests sent while the device reboots get
    # no answer at all; the default request timeout (5 s) must not be what waits.
    caplog.set_level(logging.INFO)
    phases: dict[Phase, float] = {}
    updater = FirmwareUpdater(
        _UdpTransport(udp_server.port), world.clock, device=massager.name, address="127.0.0.1"
    )
    result = await asyncio.wait_for(
        updater.update(
            new_image("2.0.0"), on_phase=lambda p: phases.setdefault(p, world.clock.now_s())
        ),
        HANG_GUARD_S,
    )
    await updater.close()
    assert result.outcome is UpdateOutcome.UPDATED
    reboot_s = RESET_DELAY_S + BOOT_TIME_S + SWAP_TIME_S
    waited_s = phases[Phase.CONFIRMING] - phases[Phase.RESETTING]
    # The device needs reboot_s; the bridge notices within one probe timeout (0.5 s).
    assert reboot_s <= waited_s < reboot_s + 0.6
    assert not [r for r in caplog.records if "Timeout" in r.getMessage()]


async def test_the_reset_over_ble_waits_for_the_device_to_advertise_again(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    phases: dict[Phase, float] = {}
    updater = ble_updater(world, massager)
    result = await asyncio.wait_for(
        updater.update(
            new_image("2.1.0"), on_phase=lambda p: phases.setdefault(p, world.clock.now_s())
        ),
        HANG_GUARD_S,
    )
    await updater.close()
    assert result.outcome is UpdateOutcome.UPDATED
    reboot_s = RESET_DELAY_S + BOOT_TIME_S + SWAP_TIME_S
    waited_s = phases[Phase.CONFIRMING] - phases[Phase.RESETTING]
    # Plus an advertising interval (0.1 s) and a connection event or two.
    assert reboot_s <= waited_s < reboot_s + 0.6


async def test_an_image_larger_than_the_slot_is_refused_before_a_byte_is_sent(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    firmware.slot_bytes = 48 * 1024
    image = new_image("3.0.0")  # 64 KiB of body
    updater = ble_updater(world, massager)
    with pytest.raises(ImageTooLargeError) as refused:
        await asyncio.wait_for(updater.update(image), HANG_GUARD_S)
    await updater.close()
    assert refused.value.slot_bytes == 48 * 1024
    assert refused.value.image_bytes == image.size_bytes
    message = str(refused.value)
    assert "49,152 bytes (48 KiB)" in message
    assert "nothing was uploaded" in message
    assert firmware.upload_bytes == 0
    assert firmware.upload_offset is None
    assert firmware.secondary is None


async def test_a_device_without_slot_info_refuses_the_size_itself(
    world: SimulatedWorld, massager: SimulatedMassager, firmware: SmpFirmware
) -> None:
    firmware.slot_bytes = 48 * 1024
    firmware.supports_slot_info = False
    image = new_image("3.0.0")
    updater = ble_updater(world, massager)
    with pytest.raises(ImageTooLargeError) as refused:
        await asyncio.wait_for(updater.update(image), HANG_GUARD_S)
    await updater.close()
    assert refused.value.slot_bytes is None
    assert "refused it as too large" in str(refused.value)
    assert firmware.secondary is None
