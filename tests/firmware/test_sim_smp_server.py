"""The simulated SMP server, spoken to with the ``smp`` package's models (another codec)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from smp import error as smperr
from smp import image_management as smpimg
from smp import os_management as smpos
from smp import packet as smppacket
from smp.message import Request

from simulators import SimulatedWorld, VirtualClock
from simulators.smp import ImageDefect, SmpFirmware, build_image
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
