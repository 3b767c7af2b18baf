"""Every command's ack and result code, on both device kinds."""

from __future__ import annotations

import struct

import pytest

from protocols import (
    Ack,
    BootEvent,
    Command,
    CommandBody,
    DeviceProfile,
    EventCode,
    GetInfo,
    MassageMode,
    Opcode,
    Ping,
    ProgramAbort,
    ProgramBegin,
    ProgramCommit,
    ProgramStart,
    ResetReason,
    ResultCode,
    SetIntensity,
    SetMode,
    SetZone,
    StartLed,
    StartStream,
    StopAll,
    StopLed,
    StopStream,
    Zone,
)
from simulators import Channel, SimulatedDevice, SimulatedWorld, VirtualClock
from simulators.devices.mask import HARDWARE_MAX_IRRADIANCE_MW_CM2

from .conftest import Commander, RecordingLink

PROGRAM_COMMANDS: list[CommandBody] = [
    ProgramBegin(1, 100, 0xDEADBEEF),
    ProgramCommit(1),
    ProgramStart(),
    ProgramAbort(),
]
MASSAGER_ONLY: list[CommandBody] = [SetIntensity(3), SetMode(MassageMode.PULSE), SetZone(Zone.CHIN)]
MASK_ONLY: list[CommandBody] = [StartLed(20.0, 10.0, 0.0, 60), StopLed()]


def connect(device: SimulatedDevice) -> tuple[RecordingLink, Commander]:
    link = RecordingLink()
    device.attach_link(link)
    return link, Commander(device, link)


@pytest.fixture(params=["massager", "mask"])
async def device(request: pytest.FixtureRequest, world: SimulatedWorld) -> SimulatedDevice:
    return world.add_massager() if request.param == "massager" else world.add_mask()


@pytest.mark.parametrize(
    "body", [GetInfo(), StartStream(), StopStream(), Ping(), StopAll()], ids=lambda b: b.opcode.name
)
async def test_common_commands_ok(device: SimulatedDevice, body: CommandBody) -> None:
    _, command = connect(device)
    ack = command(body)
    assert ack.result == ResultCode.OK
    if isinstance(body, GetInfo):
        assert DeviceProfile.decode(ack.payload) == device.profile
    else:
        assert ack.payload == b""


async def test_program_commands_without_a_whole_program(device: SimulatedDevice) -> None:
    # Issue 3: both kinds take programs (tests/programs/ covers the transfer in full).
    _, command = connect(device)
    begin, commit, start, abort = PROGRAM_COMMANDS
    assert command(begin).result == ResultCode.OK
    assert command(commit).result == ResultCode.INVALID_PARAMETER  # no byte arrived
    assert command(start).result == ResultCode.INVALID_PARAMETER  # nothing committed
    assert command(abort).result == ResultCode.OK


async def test_kind_specific_commands_are_not_supported_on_the_other_kind(
    world: SimulatedWorld,
) -> None:
    _, massager = connect(world.add_massager())
    _, mask = connect(world.add_mask())
    for body in MASK_ONLY:
        assert massager(body).result == ResultCode.NOT_SUPPORTED
    for body in MASSAGER_ONLY:
        assert mask(body).result == ResultCode.NOT_SUPPORTED
    for body in MASSAGER_ONLY:
        assert massager(body).result == ResultCode.OK
    for body in MASK_ONLY:
        assert mask(body).result == ResultCode.OK


async def test_unknown_opcode_and_invalid_parameters(device: SimulatedDevice) -> None:
    _, command = connect(device)
    ack = command.raw(Command(77, 0x6E, b"\x01").encode())
    assert ack == Ack(77, 0x6E, ResultCode.UNKNOWN_OPCODE)
    # GET_INFO takes no parameters; PING neither.
    ack = command.raw(Command(78, Opcode.GET_INFO, b"\x00").encode())
    assert ack == Ack(78, Opcode.GET_INFO, ResultCode.INVALID_PARAMETER)
    ack = command.raw(Command(79, Opcode.REQUEST_BACKFILL, b"\x00\x00").encode())
    assert ack == Ack(79, Opcode.REQUEST_BACKFILL, ResultCode.INVALID_PARAMETER)


async def test_massager_commands_change_state(world: SimulatedWorld, clock: VirtualClock) -> None:
    massager = world.add_massager()
    link, command = connect(massager)
    bad = [
        (Opcode.SET_INTENSITY, b"\x0b"),  # 11 > 10
        (Opcode.SET_MODE, b"\x09"),
        (Opcode.SET_ZONE, b"\x63"),
        (Opcode.SET_ZONE, b""),
    ]
    for index, (opcode, params) in enumerate(bad):
        ack = command.raw(Command(200 + index, opcode, params).encode())
        assert ack == Ack(200 + index, opcode, ResultCode.INVALID_PARAMETER)
    assert command(SetIntensity(7)).ok
    assert command(SetMode(MassageMode.PERCUSSION)).ok
    assert massager.motor_on
    assert massager.busy
    command(StartStream())
    await clock.advance(0.2)
    last = link.batches()[-1].samples[-1]
    assert (int(last["intensity"]), int(last["mode"])) == (7, MassageMode.PERCUSSION)
    assert command(StopAll()).ok
    assert not massager.motor_on
    assert (massager.intensity, massager.mode) == (0, MassageMode.OFF)
    link.clear()
    assert command(SetZone(Zone.MASSETER_LEFT)).ok
    events = link.events()
    # The ack comes first, then the event the command caused.
    assert link.messages[0][0] is Channel.CONTROL
    assert [(e.code, e.payload) for e in events] == [
        (EventCode.ZONE_CHANGED, bytes([Zone.MASSETER_LEFT]))
    ]


async def test_mask_parameter_checks(world: SimulatedWorld) -> None:
    mask = world.add_mask()
    link, command = connect(mask)
    over = HARDWARE_MAX_IRRADIANCE_MW_CM2 + 0.01
    assert command(StartLed(over, 0, 0, 60)).result == ResultCode.INVALID_PARAMETER
    assert command(StartLed(0, 0, over, 60)).result == ResultCode.INVALID_PARAMETER
    assert command(StartLed(0, 0, 0, 60)).result == ResultCode.INVALID_PARAMETER
    assert command(StartLed(10, 0, 0, 0)).result == ResultCode.INVALID_PARAMETER
    assert command(StartLed(10, 0, 0, 10_000)).result == ResultCode.INVALID_PARAMETER
    assert mask.treatment is None
    assert command(StartLed(HARDWARE_MAX_IRRADIANCE_MW_CM2, 0, 0, 60)).ok
    assert command(StartLed(10, 0, 0, 60)).result == ResultCode.BUSY
    assert command(StopLed()).ok
    assert command(StopLed()).ok  # idempotent
    finished = [e for e in link.events() if e.code == EventCode.TREATMENT_FINISHED]
    assert [e.payload for e in finished] == [b"\x01"]  # STOPPED_BY_HOST, once


async def test_frames_that_are_not_commands_are_ignored_and_counted(
    device: SimulatedDevice,
) -> None:
    link, command = connect(device)
    before = device.ignored_frames
    assert command.raw(b"") is None
    assert command.raw(b"\x02\x01\x00\x01\x00") is None  # an ack sent back to the device
    assert command.raw(b"\x01\x01") is None  # truncated command
    device.receive(Channel.PROGRAM, b"\x30\x01\x00\x00\x00\x00\x00")
    assert device.ignored_frames == before + 4
    assert link.acks() == []


async def test_ack_echoes_command_id_and_opcode(device: SimulatedDevice) -> None:
    _, command = connect(device)
    for command_id in (0, 1, 0xFFFF):
        ack = command.raw(Command.of(command_id, Ping()).encode())
        assert ack is not None
        assert (ack.command_id, ack.opcode) == (command_id, Opcode.PING)


async def test_event_sequence_and_device_time(world: SimulatedWorld) -> None:
    massager = world.add_massager()
    link, command = connect(massager)
    command(SetZone(Zone.CHIN))
    command(SetZone(Zone.NECK))
    events = link.events()
    # BOOT (0) happened before the link; it waited for the host's first command.
    assert [e.event_sequence for e in events] == [0, 1, 2]
    assert massager.events[0].code == events[0].code == EventCode.BOOT
    assert BootEvent.decode(events[0].payload) == BootEvent(ResetReason.POWER_ON)
    assert struct.unpack("<B", events[2].payload) == (Zone.NECK,)
