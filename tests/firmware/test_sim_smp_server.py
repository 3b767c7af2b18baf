"""The simulated SMP server, spoken to with the ``smp`` package's models (another codec)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from bleak import BleakClient
from smp import error as smperr
from smp import image_management as smpimg
from smp import os_management as smpos
from smp import packet as smppacket
from smp.message import Request

from protocols.constants import SMP_CHARACTERISTIC_UUID
from simulators import SimulatedWorld, VirtualClock
from simulators.smp import (
    FirmwareStateStore,
    ImageDefect,
    Radio,
    SmpFirmware,
    build_image,
)
from simulators.smp.constants import SMP_HEADER, VERSION_SHIFT, Group
from simulators.smp.radio import Direction
from simulators.smp.serial_port import ConsoleFrameDecoder, encode_console_frame

IMAGE = build_image("1.4.0", "OFC-FM1", body_bytes=10_000)
SHA = hashlib.sha256(IMAGE).digest()
CHUNK_BYTES = 1000


def call(firmware: SmpFirmware, request: Request) -> bytes:
    replies: list[bytes] = []
    firmware.handle(bytes(request), replies.append)
    assert len(replies) == 1
    return replies[0]


def upload(firmware: SmpFirmware, offset: int, **fields: Any) -> Any:
    chunk = IMAGE[offset : offset + CHUNK_BYTES]
    reply = call(firmware, smpimg.ImageUploadWriteRequest(off=offset, data=chunk, **fields))
    try:
        return smpimg.ImageUploadWriteResponse.loads(reply)
    except ValueError:
        return smpimg.ImageManagementErrorV2.loads(reply)


def states(firmware: SmpFirmware) -> list[smpimg.ImageState]:
    reply = call(firmware, smpimg.ImageStatesReadRequest())
    return smpimg.ImageStatesReadResponse.loads(reply).images


def test_echo_parameters_and_unknown_commands(firmware: SmpFirmware) -> None:
    echo = smpos.EchoWriteResponse.loads(call(firmware, smpos.EchoWriteRequest(d="hello")))
    assert echo.r == "hello"
    params = smpos.MCUMgrParametersReadResponse.loads(
        call(firmware, smpos.MCUMgrParametersReadRequest())
    )
    assert params.buf_size == firmware.buf_size
    unknown = smpos.OSManagementErrorV1.loads(call(firmware, smpos.TaskStatisticsReadRequest()))
    assert unknown.rc == smperr.MGMT_ERR.ENOTSUP


def test_upload_resumes_by_hash_and_resyncs_a_wrong_offset(firmware: SmpFirmware) -> None:
    first = upload(firmware, 0, len=len(IMAGE), sha=SHA, image=0)
    assert first.off == CHUNK_BYTES
    assert upload(firmware, CHUNK_BYTES).off == 2 * CHUNK_BYTES
    # A chunk from the wrong place is dropped; the reply says where to go on.
    assert upload(firmware, 5 * CHUNK_BYTES).off == 2 * CHUNK_BYTES
    # Starting over with the same sha and length continues where the device is.
    resumed = upload(firmware, 0, len=len(IMAGE), sha=SHA, image=0)
    assert resumed.off == 2 * CHUNK_BYTES
    assert firmware.upload_resumes == 1
    offset = resumed.off
    while offset < len(IMAGE):
        response = upload(firmware, offset)
        offset = response.off
    assert response.match is True
    slots = states(firmware)
    assert [s.slot for s in slots] == [0, 1]
    assert slots[1].hash == check_hash(IMAGE)
    assert slots[1].version == "1.4.0"
    assert not slots[1].pending


def check_hash(data: bytes) -> bytes:
    from simulators.smp import check_image

    return check_image(data).hash


def test_upload_refuses_a_wrong_magic_and_a_too_large_image(firmware: SmpFirmware) -> None:
    bad = build_image("1.4.0", "OFC-FM1", defect=ImageDefect.WRONG_MAGIC)
    reply = call(
        firmware, smpimg.ImageUploadWriteRequest(off=0, data=bad[:64], len=len(bad), image=0)
    )
    error = smpimg.ImageManagementErrorV2.loads(reply)
    assert error.err.rc == smpimg.IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC
    too_large = upload(firmware, 0, len=firmware.slot_bytes + 1, image=0)
    assert too_large.err.rc == smpimg.IMG_MGMT_ERR.INVALID_IMAGE_TOO_LARGE


async def test_test_then_reset_runs_unconfirmed_and_the_next_reset_reverts(
    firmware: SmpFirmware, world: SimulatedWorld, clock: VirtualClock
) -> None:
    offset = upload(firmware, 0, len=len(IMAGE), sha=SHA, image=0).off
    while offset < len(IMAGE):
        offset = upload(firmware, offset).off
    digest = check_hash(IMAGE)
    # Testing the running image is refused; testing the uploaded one marks it pending.
    refused = smpimg.ImageManagementErrorV2.loads(
        call(firmware, smpimg.ImageStatesWriteRequest(hash=firmware.primary.hash))
    )
    assert refused.err.rc == smpimg.IMG_MGMT_ERR.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED
    marked = smpimg.ImageStatesWriteResponse.loads(
        call(firmware, smpimg.ImageStatesWriteRequest(hash=digest))
    )
    assert marked.images[1].pending
    assert not marked.images[1].permanent
    reset = smpos.ResetWriteResponse.loads(call(firmware, smpos.ResetWriteRequest()))
    assert reset.header.command_id == smpos.ResetWriteRequest._COMMAND_ID
    await _wait_booted(firmware, clock, boots=1)
    slots = states(firmware)
    assert slots[0].hash == digest
    assert slots[0].active
    assert not slots[0].confirmed
    assert slots[1].version == "1.0.0"
    assert slots[1].confirmed
    assert firmware.device.firmware_revision == "1.4.0"
    # Not confirmed: the next reset goes back to the old image (MCUboot revert).
    call(firmware, smpos.ResetWriteRequest())
    await _wait_booted(firmware, clock, boots=2)
    slots = states(firmware)
    assert slots[0].version == "1.0.0"
    assert slots[0].confirmed
    assert slots[1].hash == digest
    assert not slots[1].pending
    assert firmware.reverts == 1
    assert firmware.device.firmware_revision == "1.0.0-sim"


async def test_confirmed_image_survives_resets(firmware: SmpFirmware, clock: VirtualClock) -> None:
    offset = upload(firmware, 0, len=len(IMAGE), sha=SHA, image=0).off
    while offset < len(IMAGE):
        offset = upload(firmware, offset).off
    call(firmware, smpimg.ImageStatesWriteRequest(hash=check_hash(IMAGE)))
    call(firmware, smpos.ResetWriteRequest())
    await _wait_booted(firmware, clock, boots=1)
    confirmed = smpimg.ImageStatesWriteResponse.loads(
        call(firmware, smpimg.ImageStatesWriteRequest(confirm=True))
    )
    assert confirmed.images[0].confirmed
    call(firmware, smpos.ResetWriteRequest())
    await _wait_booted(firmware, clock, boots=2)
    assert states(firmware)[0].version == "1.4.0"
    # Erase clears the old image from the secondary slot.
    call(firmware, smpimg.ImageEraseRequest())
    assert [s.slot for s in states(firmware)] == [0]


async def _wait_booted(firmware: SmpFirmware, clock: VirtualClock, *, boots: int) -> None:
    """Step virtual time (the world's driver runs it) until the device has booted again."""

    async def booted() -> None:
        while firmware.boots < boots or not firmware.device.is_powered:
            await clock.sleep(0.05)

    await asyncio.wait_for(booted(), timeout=10)  # a real-time safety net only


@pytest.mark.parametrize("size", [0, 1, 90, 95, 96, 1000])
def test_console_framing_matches_the_smp_package(size: int) -> None:
    message = bytes(range(256)) * (size // 256 + 1)
    message = message[:size]
    ours = encode_console_frame(message)
    theirs = b"".join(smppacket.encode(message, line_length=128))
    assert ours == theirs
    decoder = ConsoleFrameDecoder()
    assert decoder.feed(b"console noise\n" + ours[:7]) == []
    assert decoder.feed(ours[7:]) == [message]


# --------------------------------------------------------------------------- Zephyr's upload rules


def _full_upload(firmware: SmpFirmware) -> int:
    """Upload IMAGE in CHUNK_BYTES requests; the offset of the last request."""
    offset = upload(firmware, 0, len=len(IMAGE), sha=SHA, image=0).off
    last = 0
    while offset < len(IMAGE):
        last = offset
        offset = upload(firmware, offset).off
    return last


def test_a_chunk_with_no_upload_in_progress_is_answered_with_offset_zero(
    firmware: SmpFirmware,
) -> None:
    # Nothing started: Zephyr drops the data and says it expects offset 0.
    assert upload(firmware, 3 * CHUNK_BYTES).off == 0
    assert firmware.upload_offset is None
    last = _full_upload(firmware)
    # The answer to the last chunk was lost and the client sends it again: the upload
    # is over, so the device again expects 0 (and the slot is untouched).
    assert upload(firmware, last).off == 0
    assert states(firmware)[1].hash == check_hash(IMAGE)


def test_a_first_chunk_for_the_image_the_slot_holds_completes_at_once(
    firmware: SmpFirmware,
) -> None:
    _full_upload(firmware)
    received = firmware.upload_bytes
    again = upload(firmware, 0, len=len(IMAGE), sha=SHA, image=0)
    assert (again.off, again.match) == (len(IMAGE), True)
    assert firmware.upload_offset is None  # nothing erased, nothing started
    assert states(firmware)[1].hash == check_hash(IMAGE)
    assert firmware.upload_bytes == received + CHUNK_BYTES


def test_an_overrun_ends_the_upload(firmware: SmpFirmware) -> None:
    upload(firmware, 0, len=1500, sha=SHA, image=0)
    overrun = upload(firmware, CHUNK_BYTES)  # 1000 more bytes of a 1500-byte image
    assert overrun.err.rc == smpimg.IMG_MGMT_ERR.INVALID_IMAGE_DATA_OVERRUN
    assert firmware.upload_offset is None


def test_slot_info_reports_the_slot_sizes(firmware: SmpFirmware) -> None:
    body = cbor2.dumps({})
    request = SMP_HEADER.pack(1 << VERSION_SHIFT, 0, len(body), Group.IMAGE, 0x80, 6) + body
    replies: list[bytes] = []
    firmware.handle(request, replies.append)
    body = cbor2.loads(replies[0][8:])
    assert body["images"][0]["slots"] == [
        {"slot": 0, "size": firmware.slot_bytes},
        {"slot": 1, "size": firmware.slot_bytes, "upload_image_id": 0},
    ]
    firmware.supports_slot_info = False
    firmware.handle(request, replies.append)
    assert cbor2.loads(replies[1][8:]) == {"rc": smperr.MGMT_ERR.ENOTSUP}


# ------------------------------------------------------------------- flash kept between runs


def test_a_snapshot_keeps_slots_pending_swap_and_the_partial_upload(
    world: SimulatedWorld, firmware: SmpFirmware
) -> None:
    _full_upload(firmware)
    call(firmware, smpimg.ImageStatesWriteRequest(hash=check_hash(IMAGE)))
    other = build_image("1.5.0", "OFC-FM1", body_bytes=3000)
    saved_partial = firmware.snapshot()
    assert firmware.pending is not None

    fresh = SmpFirmware(firmware.device)
    fresh.restore(saved_partial)
    assert states(fresh) == states(firmware)
    assert fresh.pending is firmware.pending

    erased = SmpFirmware(firmware.device)
    part = upload(erased, 0, len=len(other), sha=hashlib.sha256(other).digest(), image=0)
    assert part.off == CHUNK_BYTES
    again = SmpFirmware(erased.device)
    again.restore(erased.snapshot())
    assert again.upload_offset == CHUNK_BYTES
    resumed = upload(again, 0, len=len(other), sha=hashlib.sha256(other).digest(), image=0)
    assert resumed.off == CHUNK_BYTES


@pytest.mark.parametrize(
    "damage",
    [b"", b"not cbor at all", cbor2.dumps({"format": 99}), cbor2.dumps({"format": 1})],
)
def test_a_damaged_snapshot_is_refused_and_changes_nothing(
    firmware: SmpFirmware, damage: bytes
) -> None:
    before = firmware.snapshot()
    with pytest.raises(ValueError, match=r"snapshot|slot"):
        firmware.restore(damage)
    assert firmware.snapshot() == before


def test_the_store_writes_changed_devices_and_survives_a_damaged_file(
    world: SimulatedWorld,
    firmware: SmpFirmware,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FirmwareStateStore(tmp_path / "sim")
    device = firmware.device
    assert not store.load(device, firmware)
    assert not store.save(device, firmware)  # factory state: nothing to keep
    assert not store.path_for(device).exists()
    _full_upload(firmware)
    assert store.save(device, firmware)

    later = SmpFirmware(device)
    assert FirmwareStateStore(tmp_path / "sim").load(device, later)
    assert states(later)[1].hash == check_hash(IMAGE)

    store.path_for(device).write_bytes(b"\x00garbage")
    caplog.set_level(logging.WARNING)
    factory = SmpFirmware(device)
    assert not FirmwareStateStore(tmp_path / "sim").load(device, factory)
    assert "starts from its factory image" in caplog.text
    assert [s.slot for s in states(factory)] == [0]


# ------------------------------------------------------------------ BLE buffers and airtime


async def test_requests_beyond_the_devices_buffers_are_lost_over_ble(
    world: SimulatedWorld, firmware: SmpFirmware
) -> None:
    # Flash slower than the link: requests pile up in the buffers while one is written.
    firmware.flash_bytes_per_s = 20_000
    client = BleakClient(firmware.device.address, backend=world.client_backend)
    await client.connect()
    answers: list[bytes] = []
    await client.start_notify(SMP_CHARACTERISTIC_UUID, lambda _c, data: answers.append(data))
    payload = client.mtu_size - 3

    async def write(request: Request) -> None:
        data = bytes(request)
        for start in range(0, len(data), payload):
            await client.write_gatt_char(
                SMP_CHARACTERISTIC_UUID, data[start : start + payload], response=False
            )

    chunk = 2000
    await write(
        smpimg.ImageUploadWriteRequest(off=0, data=IMAGE[:chunk], len=len(IMAGE), sha=SHA, image=0)
    )
    await _until(world, lambda: len(answers) == 1)
    # As many requests at once as the device has buffers: one more than it can take.
    sent = firmware.buf_count
    for index in range(1, sent + 1):
        offset = index * chunk
        await write(smpimg.ImageUploadWriteRequest(off=offset, data=IMAGE[offset : offset + chunk]))
    await _until(world, lambda: firmware.requests_in_flight == 0)
    await client.disconnect()
    assert firmware.dropped_requests == 1
    assert firmware.peak_buffers_in_use == firmware.buf_count
    assert len(answers) == sent  # the first, and all but the one lost
    assert firmware.upload_offset == sent * chunk  # the lost one was the last


async def test_a_request_longer_than_a_buffer_is_dropped(
    world: SimulatedWorld, firmware: SmpFirmware
) -> None:
    client = BleakClient(firmware.device.address, backend=world.client_backend)
    await client.connect()
    answers: list[bytes] = []
    await client.start_notify(SMP_CHARACTERISTIC_UUID, lambda _c, data: answers.append(data))
    data = bytes(
        smpimg.ImageUploadWriteRequest(
            off=0, data=IMAGE[: firmware.buf_size], len=len(IMAGE), image=0
        )
    )
    payload = client.mtu_size - 3
    for start in range(0, len(data), payload):
        await client.write_gatt_char(
            SMP_CHARACTERISTIC_UUID, data[start : start + payload], response=False
        )
    await _until(world, lambda: firmware.requests_in_flight == 0)
    await client.disconnect()
    assert answers == []
    assert firmware.dropped_requests == 1
    assert firmware.upload_offset is None


async def test_the_radio_takes_turns_and_waits_for_the_next_connection_event(
    world: SimulatedWorld,
) -> None:
    clock = world.clock
    radio = Radio(clock, bytes_per_s=1000, interval_s=0.5)
    connected_s = clock.now_s()
    done: list[tuple[str, float]] = []

    def mark(label: str) -> Callable[[], None]:
        return lambda: done.append((label, round(clock.now_s() - connected_s, 6)))

    # 3 packets of 97 + 3 bytes towards the device, 1 packet back: they alternate.
    radio.send(
        Direction.TO_DEVICE, 291, 97, on_first_packet=mark("first"), on_last_packet=mark("request")
    )
    radio.send(Direction.TO_HOST, 50, 97, on_last_packet=mark("answer"))
    await _until_clock(clock, lambda: len(done) == 3)
    assert done == [("first", 0.1), ("answer", 0.153), ("request", 0.353)]
    assert radio.bytes_on_air == 353
    # Queued after the event closed: it waits for the next connection event (0.5 s).
    radio.send(Direction.TO_HOST, 7, 97, on_last_packet=mark("late"))
    await _until_clock(clock, lambda: len(done) == 4)
    assert done[3] == ("late", 0.51)
    await radio.stop()


async def _until(world: SimulatedWorld, condition: Callable[[], bool]) -> None:
    await _until_clock(world.clock, condition)


async def _until_clock(clock: VirtualClock, condition: Callable[[], bool]) -> None:
    async def wait() -> None:
        while not condition():
            await clock.sleep(0.01)

    await asyncio.wait_for(wait(), timeout=10)  # a real-time safety net only
