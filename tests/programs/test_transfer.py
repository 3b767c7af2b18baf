"""Program transfer: PROGRAM_BEGIN, chunks, PROGRAM_COMMIT over BLE (tiny MTU) and a real pty."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from devicebridge.core.policy import SafetyPolicy
from devicebridge.device.program_transfer import (
    CHUNK_HEADER_BYTES,
    abort_program,
    install_program,
    program_from_routine,
    start_program,
    transfer_program_bytes,
)
from devicebridge.device.session import DeviceSession
from devicebridge.errors import CommandRejectedError, ProgramTransferError
from protocols import (
    Capability,
    DeviceKind,
    EventCode,
    LedProgramStep,
    MassageMode,
    MassageProgramStep,
    Program,
    ProgramAbort,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramEndReason,
    ProgramFinishedEvent,
    ProgramLimits,
    ProgramRejection,
    ProgramRejectReason,
    ProgramStart,
    ResultCode,
    SetIntensity,
    StartLed,
    Zone,
    program_crc32,
)
from simulators import Channel, SimulatedMassager, SimulatedWorld, VirtualClock
from simulators.links.serial_port import PtySerialPort
from tests.hooked_transport import HookedTransport, Write

from .conftest import RecordingLink, ble_session, command, library_routine, serial_session

TINY_MTU = 23  # the default ATT MTU: 20 bytes per write, 13 of them program data
LIMITS = ProgramLimits(600, 4300, 30)


@pytest.fixture(params=["ble", "serial"])
async def link(
    request: pytest.FixtureRequest, world: SimulatedWorld, clock: VirtualClock
) -> AsyncIterator[tuple[SimulatedMassager, DeviceSession]]:
    """A started session to a massager: BLE with MTU 23, or a real pty."""
    massager = world.add_massager(mtu_size=TINY_MTU)
    async with world:
        clock.start()
        port: PtySerialPort | None = None
        if request.param == "ble":
            session = await ble_session(world, massager)
        else:
            port = PtySerialPort(massager)
            await port.start()
            session = serial_session(port, clock)
        await session.start()
        try:
            yield massager, session
        finally:
            await session.close()
            if port is not None:
                await port.stop()


def firming(policy: SafetyPolicy) -> Program:
    return program_from_routine(library_routine("firming", policy), policy)


async def test_install_in_many_chunks_then_start_and_abort(
    link: tuple[SimulatedMassager, DeviceSession], policy: SafetyPolicy
) -> None:
    massager, session = link
    program = firming(policy)
    size = len(program.encode())
    per_chunk = session.transport.max_program_chunk_bytes - CHUNK_HEADER_BYTES
    # Over serial the whole program fits one frame: ask for small chunks there too.
    await install_program(session, program, transfer_id=0x1234, chunk_data_bytes=13)
    receiver = massager.program_receiver
    assert receiver.committed == program
    assert receiver.chunks_accepted == -(-size // min(per_chunk, 13)) > 5
    assert receiver.chunks_refused == 0

    events = session.events()
    await start_program(session)
    assert massager.program_running
    # While it runs: the program owns the actuators and the transfer buffer.
    for body in (ProgramBegin(2, 10, 0), ProgramCommit(2), ProgramStart(), SetIntensity(3)):
        with pytest.raises(CommandRejectedError, match="BUSY") as caught:
            await session.send(body)
        assert caught.value.result is ResultCode.BUSY
    await abort_program(session)
    assert not massager.program_running
    assert not massager.motor_on
    seen = [await anext(events)]
    while seen[-1].code != EventCode.PROGRAM_FINISHED:
        seen.append(await anext(events))
    assert EventCode.PROGRAM_STEP in [e.code for e in seen]
    assert ProgramFinishedEvent.decode(seen[-1].payload).reason is ProgramEndReason.STOPPED_BY_HOST
    await abort_program(session)  # nothing runs: still OK


async def test_chunks_out_of_order_and_duplicated_are_accepted(
    link: tuple[SimulatedMassager, DeviceSession], policy: SafetyPolicy
) -> None:
    massager, session = link
    program = firming(policy)
    data = program.encode()
    await session.send(ProgramBegin(9, len(data), program_crc32(data)))
    chunks = [
        ProgramChunk(9, offset, data[offset : offset + 10]) for offset in range(0, len(data), 10)
    ]
    # Overlapping pieces too: a resend with other boundaries.
    chunks += [ProgramChunk(9, 5, data[5:25]), chunks[0], chunks[-1]]
    random.Random(7).shuffle(chunks)
    for chunk in chunks:
        await session.transport.write_program_chunk(chunk.encode())
    await session.send(ProgramCommit(9))
    assert massager.program_receiver.committed == program


async def test_refusals_name_their_reason(
    link: tuple[SimulatedMassager, DeviceSession], policy: SafetyPolicy
) -> None:
    massager, session = link
    data = firming(policy).encode()

    with pytest.raises(ProgramTransferError) as caught:
        await transfer_program_bytes(session, data, crc32=program_crc32(data) ^ 1, transfer_id=3)
    error = caught.value
    assert (error.stage, error.result, error.reason) == (
        "commit",
        ResultCode.INVALID_PARAMETER,
        ProgramRejectReason.CRC_MISMATCH,
    )
    assert error.detail == program_crc32(data)
    assert "CRC_MISMATCH" in str(error)
    assert massager.program_receiver.committed is None

    garbage = bytes(range(40))
    with pytest.raises(ProgramTransferError) as caught:
        await transfer_program_bytes(session, garbage, transfer_id=4)
    assert caught.value.reason is ProgramRejectReason.MALFORMED

    mask_program = Program(
        DeviceKind.LED_MASK, LIMITS, (LedProgramStep(1000, 0, 0, 60, 0, 60, 0, 0),)
    )
    with pytest.raises(ProgramTransferError) as caught:
        await install_program(session, mask_program)
    assert caught.value.reason is ProgramRejectReason.WRONG_DEVICE_KIND

    # A chunk beyond the announced size is refused, and so is the commit.
    await session.send(ProgramBegin(5, len(data), program_crc32(data)))
    for offset in range(0, len(data), 16):
        await session.transport.write_program_chunk(
            ProgramChunk(5, offset, data[offset : offset + 16]).encode()
        )
    await session.transport.write_program_chunk(ProgramChunk(5, len(data) - 2, b"abcd").encode())
    assert await refused_commit(session, 5) == ProgramRejection(
        ProgramRejectReason.CHUNK_REFUSED, len(data) - 2
    )
    assert massager.program_receiver.chunks_refused == 1

    # Bytes missing: INCOMPLETE with the first missing offset; nothing committed to start.
    await session.send(ProgramBegin(6, len(data), program_crc32(data)))
    await session.transport.write_program_chunk(ProgramChunk(6, 0, data[:20]).encode())
    assert await refused_commit(session, 6) == ProgramRejection(ProgramRejectReason.INCOMPLETE, 20)
    with pytest.raises(ProgramTransferError) as caught:
        await start_program(session)
    assert (caught.value.stage, caught.value.result) == ("start", ResultCode.INVALID_PARAMETER)


async def refused_commit(session: DeviceSession, transfer_id: int) -> ProgramRejection:
    with pytest.raises(CommandRejectedError) as caught:
        await session.send(ProgramCommit(transfer_id))
    assert caught.value.result is ResultCode.INVALID_PARAMETER
    return ProgramRejection.decode(caught.value.payload)


async def test_a_lost_chunk_is_sent_again_and_a_stuck_write_retried(
    link: tuple[SimulatedMassager, DeviceSession], policy: SafetyPolicy, clock: VirtualClock
) -> None:
    massager, session = link
    program = firming(policy)
    transport = session.transport
    calls: list[int] = []

    async def flaky(data: bytes, write: Write) -> None:
        calls.append(ProgramChunk.decode(data).offset)
        if len(calls) == 3:
            return  # lost on the way (a corrupt serial frame is dropped)
        if len(calls) == 5:
            await clock.sleep(60.0)  # never answered: the write times out
        await write(data)

    session.transport = HookedTransport(transport, program_chunk=flaky)
    await install_program(session, program, chunk_data_bytes=13)
    assert massager.program_receiver.committed == program
    # The timed-out chunk went twice; after the INCOMPLETE commit, from the lost chunk on.
    assert calls == [0, 13, 26, 39, 52, 52, 65, 26, 39, 52, 65]

    stuck = 0

    async def never(data: bytes, write: Write) -> None:
        nonlocal stuck
        stuck += 1
        await clock.sleep(60.0)

    session.transport = HookedTransport(transport, program_chunk=never)
    with pytest.raises(ProgramTransferError, match="not written within 2 s, 2 times") as caught:
        await install_program(session, program)
    assert caught.value.stage == "chunk"
    assert stuck == 2


async def test_result_codes_at_the_device(world: SimulatedWorld) -> None:
    massager = world.add_massager()
    mask = world.add_mask()
    async with world:
        for device in (massager, mask):
            link = RecordingLink()
            device.attach_link(link)
            assert Capability.PROGRAM_TRANSFER in device.profile.capabilities
            assert command(device, link, ProgramStart()).result == ResultCode.INVALID_PARAMETER
            assert (
                command(device, link, ProgramBegin(1, 0, 0)).result == ResultCode.INVALID_PARAMETER
            )
            assert (
                command(device, link, ProgramBegin(1, 5000, 0)).result
                == ResultCode.INVALID_PARAMETER
            )
            assert command(device, link, ProgramCommit(1)).result == ResultCode.INVALID_PARAMETER
            assert command(device, link, ProgramAbort()).result == ResultCode.OK

        # Beyond the mask's hardware: LIMIT_EXCEEDED, with the step in the detail.
        mask_link = mask.link
        assert isinstance(mask_link, RecordingLink)
        too_bright = Program(
            DeviceKind.LED_MASK,
            LIMITS,
            (
                LedProgramStep(1000, 0, 0, 60, 0, 60, 0, 0),
                LedProgramStep(20000, 0, 0, 60, 0, 60, 0, 0),
            ),
        )
        data = too_bright.encode()
        assert command(mask, mask_link, ProgramBegin(2, len(data), program_crc32(data))).ok
        mask.receive(Channel.PROGRAM, ProgramChunk(2, 0, data).encode())
        ack = command(mask, mask_link, ProgramCommit(2))
        assert ack.result == ResultCode.LIMIT_EXCEEDED
        assert ack.payload == bytes([ProgramRejectReason.HARDWARE_LIMIT]) + (1).to_bytes(
            4, "little"
        )

        # A running program refuses manual light; a manual treatment refuses the program.
        good = Program(DeviceKind.LED_MASK, LIMITS, (LedProgramStep(1000, 0, 0, 60, 0, 60, 0, 0),))
        data = good.encode()
        assert command(mask, mask_link, ProgramBegin(3, len(data), program_crc32(data))).ok
        mask.receive(Channel.PROGRAM, ProgramChunk(3, 0, data).encode())
        assert command(mask, mask_link, ProgramCommit(3)).ok
        assert command(mask, mask_link, StartLed(10, 0, 0, 60)).ok
        assert command(mask, mask_link, ProgramStart()).result == ResultCode.BUSY
        assert command(mask, mask_link, ProgramAbort()).ok  # stops nothing: no program runs
        assert mask.treatment is not None
        assert command(mask, mask_link, StartLed(10, 0, 0, 60)).result == ResultCode.BUSY
        assert command(mask, mask_link, ProgramBegin(4, 10, 0)).ok


async def test_devices_without_the_capability_do_not_support_programs(
    clock: VirtualClock,
) -> None:
    class OldMassager(SimulatedMassager):
        capabilities = SimulatedMassager.capabilities & ~Capability.PROGRAM_TRANSFER

    device = OldMassager(clock)
    device.start()
    try:
        link = RecordingLink()
        device.attach_link(link)
        for body in (ProgramBegin(1, 10, 0), ProgramCommit(1), ProgramStart(), ProgramAbort()):
            assert command(device, link, body).result == ResultCode.NOT_SUPPORTED
        before = device.ignored_frames
        device.receive(Channel.PROGRAM, ProgramChunk(1, 0, b"x").encode())
        assert device.ignored_frames == before + 1
    finally:
        await device.stop()


def test_program_from_routine_takes_its_limits_from_the_policy(policy: SafetyPolicy) -> None:
    program = firming(policy)
    assert program.device_kind is DeviceKind.MASSAGER
    assert program.limits == ProgramLimits(1200, 4300, 30)
    first, *_, last = program.steps
    assert first == MassageProgramStep(
        Zone.CHEEK_LEFT, MassageMode.VIBRATION, 5, 600, 400, 1200, 1500
    )
    assert isinstance(last, MassageProgramStep)
    assert (last.zone, last.contact_time_ds, last.pressure_cap_dapa) == (Zone.CHIN, 450, 2500)
    assert len(program.steps) == 5

    routine = library_routine("led_red_near_infrared", policy)
    led = program_from_routine(routine, policy)
    assert led.device_kind is DeviceKind.LED_MASK
    assert led.limits.session_length_cap_s == 1200
    step = led.steps[0]
    assert isinstance(step, LedProgramStep)
    planned = [round(routine.dose_j_cm2(ch) * 100) for ch in ("red", "near_infrared", "blue")]
    caps = [step.dose_cap_centi_j_cm2(ch) for ch in range(3)]
    assert caps == [min(p, 6000 if ch < 2 else 5000) for ch, p in enumerate(planned)]
    # Dose already delivered today lowers what the device may deliver.
    tight = program_from_routine(routine, policy, dose_today_j_cm2={"red": 58.0})
    tight_step = tight.steps[0]
    assert isinstance(tight_step, LedProgramStep)
    assert tight_step.red_dose_cap_centi_j_cm2 == min(200, planned[0])
