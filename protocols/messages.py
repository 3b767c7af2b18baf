"""Command, acknowledgement and event messages, and the device profile.

Layouts are little-endian; ``docs/protocol.md`` is the normative description
and names the same fields.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocols.constants import (
    CENTI_MW_CM2_PER_MW_CM2,
    DECI_HZ_PER_HZ,
    MAX_INTENSITY_LEVEL,
    PROTOCOL_VERSION,
    Capability,
    DeviceKind,
    EventCode,
    MassageMode,
    MessageType,
    Opcode,
    ResetReason,
    ResultCode,
    ShutdownReason,
    Zone,
    enum_or_int,
)
from protocols.errors import (
    EncodeError,
    FrameError,
    InvalidFieldError,
    TruncatedFrameError,
)

_COMMAND_HEADER: Final = struct.Struct("<BHB")  # type, command_id, opcode
_ACK_HEADER: Final = struct.Struct("<BHBB")  # type, command_id, opcode, result
_EVENT_HEADER: Final = struct.Struct("<BHIB")  # type, event_seq, device_time_ms, code
_PROGRAM_CHUNK_HEADER: Final = struct.Struct("<BHI")  # type, transfer_id, offset

MAX_COMMAND_ID: Final = 0xFFFF
MAX_STRING_BYTES: Final = 64


def _u16(value: int, name: str) -> int:
    if not 0 <= value <= 0xFFFF:
        raise EncodeError(f"{name}={value} does not fit in an unsigned 16-bit field")
    return value


def _u32(value: int, name: str) -> int:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise EncodeError(f"{name}={value} does not fit in an unsigned 32-bit field")
    return value


def _require(data: bytes, needed: int, what: str) -> None:
    if len(data) < needed:
        raise TruncatedFrameError(what=what, needed=needed, got=len(data), data=data)


def _exact(data: bytes, needed: int, what: str) -> None:
    _require(data, needed, what)
    if len(data) != needed:
        raise FrameError(f"expected exactly {needed} bytes, got {len(data)}", what=what, data=data)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class GetInfo:
    """Ask for the device profile; the ack payload is a :class:`DeviceProfile`."""

    opcode = Opcode.GET_INFO

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class StartStream:
    """Start live telemetry notifications."""

    opcode = Opcode.START_STREAM

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class StopStream:
    opcode = Opcode.STOP_STREAM

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Ping:
    opcode = Opcode.PING

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class RequestBackfill:
    """Resend ``sample_count`` samples from ``first_sequence`` (from the ring buffer).

    The ack payload is a :class:`BackfillReply`; the samples follow as telemetry
    batches with the backfill flag set.
    """

    first_sequence: int
    sample_count: int
    opcode = Opcode.REQUEST_BACKFILL
    _LAYOUT = struct.Struct("<II")

    def encode_params(self) -> bytes:
        return self._LAYOUT.pack(
            _u32(self.first_sequence, "first_sequence"), _u32(self.sample_count, "sample_count")
        )

    @classmethod
    def decode_params(cls, data: bytes) -> RequestBackfill:
        _exact(data, cls._LAYOUT.size, "REQUEST_BACKFILL parameters")
        first, count = cls._LAYOUT.unpack(data)
        return cls(first, count)


@dataclass(frozen=True, slots=True)
class SetIntensity:
    level: int  # 0 (off) .. MAX_INTENSITY_LEVEL
    opcode = Opcode.SET_INTENSITY

    def encode_params(self) -> bytes:
        if not 0 <= self.level <= MAX_INTENSITY_LEVEL:
            raise EncodeError(f"intensity level {self.level} outside 0..{MAX_INTENSITY_LEVEL}")
        return bytes([self.level])

    @classmethod
    def decode_params(cls, data: bytes) -> SetIntensity:
        _exact(data, 1, "SET_INTENSITY parameters")
        if data[0] > MAX_INTENSITY_LEVEL:
            raise InvalidFieldError(
                f"{data[0]} > {MAX_INTENSITY_LEVEL}", what="SET_INTENSITY", field="level", data=data
            )
        return cls(data[0])


@dataclass(frozen=True, slots=True)
class SetMode:
    mode: MassageMode | int
    opcode = Opcode.SET_MODE

    def encode_params(self) -> bytes:
        return bytes([int(self.mode) & 0xFF])

    @classmethod
    def decode_params(cls, data: bytes) -> SetMode:
        _exact(data, 1, "SET_MODE parameters")
        return cls(enum_or_int(MassageMode, data[0]))


@dataclass(frozen=True, slots=True)
class SetZone:
    """Tell the device which zone the user is working on (shown in its samples)."""

    zone: Zone | int
    opcode = Opcode.SET_ZONE

    def encode_params(self) -> bytes:
        return bytes([int(self.zone) & 0xFF])

    @classmethod
    def decode_params(cls, data: bytes) -> SetZone:
        _exact(data, 1, "SET_ZONE parameters")
        return cls(enum_or_int(Zone, data[0]))


@dataclass(frozen=True, slots=True)
class StartLed:
    """Start an LED treatment; the device stops it by itself after ``duration_s``.

    ``pulse_hz`` 0 means continuous light.
    """

    red_mw_cm2: float
    near_infrared_mw_cm2: float
    blue_mw_cm2: float
    duration_s: int
    pulse_hz: float = 0.0
    opcode = Opcode.START_LED
    _LAYOUT = struct.Struct("<HHHHH")

    def encode_params(self) -> bytes:
        def irr(value: float, name: str) -> int:
            return _u16(round(value * CENTI_MW_CM2_PER_MW_CM2), name)

        return self._LAYOUT.pack(
            irr(self.red_mw_cm2, "red_mw_cm2"),
            irr(self.near_infrared_mw_cm2, "near_infrared_mw_cm2"),
            irr(self.blue_mw_cm2, "blue_mw_cm2"),
            _u16(self.duration_s, "duration_s"),
            _u16(round(self.pulse_hz * DECI_HZ_PER_HZ), "pulse_hz"),
        )

    @classmethod
    def decode_params(cls, data: bytes) -> StartLed:
        _exact(data, cls._LAYOUT.size, "START_LED parameters")
        red, nir, blue, duration_s, pulse = cls._LAYOUT.unpack(data)
        return cls(
            red / CENTI_MW_CM2_PER_MW_CM2,
            nir / CENTI_MW_CM2_PER_MW_CM2,
            blue / CENTI_MW_CM2_PER_MW_CM2,
            duration_s,
            pulse / DECI_HZ_PER_HZ,
        )


@dataclass(frozen=True, slots=True)
class StopLed:
    opcode = Opcode.STOP_LED

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class StopAll:
    """Safety stop: every actuator off at once. Devices must always accept it."""

    opcode = Opcode.STOP_ALL

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class ProgramBegin:
    """Announce a program transfer of ``total_bytes`` whose CRC-32 is ``crc32``."""

    transfer_id: int
    total_bytes: int
    crc32: int
    opcode = Opcode.PROGRAM_BEGIN
    _LAYOUT = struct.Struct("<HII")

    def encode_params(self) -> bytes:
        return self._LAYOUT.pack(
            _u16(self.transfer_id, "transfer_id"),
            _u32(self.total_bytes, "total_bytes"),
            _u32(self.crc32, "crc32"),
        )

    @classmethod
    def decode_params(cls, data: bytes) -> ProgramBegin:
        _exact(data, cls._LAYOUT.size, "PROGRAM_BEGIN parameters")
        return cls(*cls._LAYOUT.unpack(data))


@dataclass(frozen=True, slots=True)
class ProgramCommit:
    transfer_id: int
    opcode = Opcode.PROGRAM_COMMIT

    def encode_params(self) -> bytes:
        return struct.pack("<H", _u16(self.transfer_id, "transfer_id"))

    @classmethod
    def decode_params(cls, data: bytes) -> ProgramCommit:
        _exact(data, 2, "PROGRAM_COMMIT parameters")
        return cls(struct.unpack("<H", data)[0])


@dataclass(frozen=True, slots=True)
class ProgramStart:
    opcode = Opcode.PROGRAM_START

    def encode_params(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class ProgramAbort:
    opcode = Opcode.PROGRAM_ABORT

    def encode_params(self) -> bytes:
        return b""


CommandBody: TypeAlias = (
    GetInfo
    | StartStream
    | StopStream
    | Ping
    | RequestBackfill
    | SetIntensity
    | SetMode
    | SetZone
    | StartLed
    | StopLed
    | StopAll
    | ProgramBegin
    | ProgramCommit
    | ProgramStart
    | ProgramAbort
)

_EMPTY_BODIES: Final[dict[Opcode, CommandBody]] = {
    Opcode.GET_INFO: GetInfo(),
    Opcode.START_STREAM: StartStream(),
    Opcode.STOP_STREAM: StopStream(),
    Opcode.PING: Ping(),
    Opcode.STOP_LED: StopLed(),
    Opcode.STOP_ALL: StopAll(),
    Opcode.PROGRAM_START: ProgramStart(),
    Opcode.PROGRAM_ABORT: ProgramAbort(),
}


@dataclass(frozen=True, slots=True)
class Command:
    """A command frame: ``command_id`` is echoed in the acknowledgement."""

    command_id: int
    opcode: Opcode | int
    params: bytes = b""

    @classmethod
    def of(cls, command_id: int, body: CommandBody) -> Command:
        return cls(_u16(command_id, "command_id"), body.opcode, body.encode_params())

    def encode(self) -> bytes:
        return (
            _COMMAND_HEADER.pack(
                MessageType.COMMAND, _u16(self.command_id, "command_id"), int(self.opcode) & 0xFF
            )
            + self.params
        )

    def body(self) -> CommandBody:
        """Typed parameters; raises :class:`FrameError` for unknown or malformed ones."""
        opcode = self.opcode
        if not isinstance(opcode, Opcode):
            raise InvalidFieldError(
                f"unknown opcode 0x{int(opcode):02x}", what="command", field="opcode"
            )
        if opcode in _EMPTY_BODIES:
            _exact(self.params, 0, f"{opcode.name} parameters")
            return _EMPTY_BODIES[opcode]
        decoders: dict[Opcode, Callable[[bytes], CommandBody]] = {
            Opcode.REQUEST_BACKFILL: RequestBackfill.decode_params,
            Opcode.SET_INTENSITY: SetIntensity.decode_params,
            Opcode.SET_MODE: SetMode.decode_params,
            Opcode.SET_ZONE: SetZone.decode_params,
            Opcode.START_LED: StartLed.decode_params,
            Opcode.PROGRAM_BEGIN: ProgramBegin.decode_params,
            Opcode.PROGRAM_COMMIT: ProgramCommit.decode_params,
        }
        return decoders[opcode](self.params)

    @classmethod
    def decode(cls, data: bytes) -> Command:
        _require(data, _COMMAND_HEADER.size, "command")
        message_type, command_id, opcode = _COMMAND_HEADER.unpack_from(data)
        if message_type != MessageType.COMMAND:
            raise InvalidFieldError(
                f"0x{message_type:02x} is not COMMAND", what="command", field="type", data=data
            )
        return cls(command_id, enum_or_int(Opcode, opcode), bytes(data[_COMMAND_HEADER.size :]))


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledgement of one command, matched by ``command_id``."""

    command_id: int
    opcode: Opcode | int
    result: ResultCode | int
    payload: bytes = b""

    @property
    def ok(self) -> bool:
        return self.result == ResultCode.OK

    def encode(self) -> bytes:
        return (
            _ACK_HEADER.pack(
                MessageType.ACK,
                _u16(self.command_id, "command_id"),
                int(self.opcode) & 0xFF,
                int(self.result) & 0xFF,
            )
            + self.payload
        )

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        _require(data, _ACK_HEADER.size, "ack")
        message_type, command_id, opcode, result = _ACK_HEADER.unpack_from(data)
        if message_type != MessageType.ACK:
            raise InvalidFieldError(
                f"0x{message_type:02x} is not ACK", what="ack", field="type", data=data
            )
        return cls(
            command_id,
            enum_or_int(Opcode, opcode),
            enum_or_int(ResultCode, result),
            bytes(data[_ACK_HEADER.size :]),
        )


@dataclass(frozen=True, slots=True)
class BackfillReply:
    """Ack payload of ``REQUEST_BACKFILL``: what the device will actually resend.

    ``first_sequence`` may be later than requested when the oldest samples have
    left the ring buffer; ``sample_count`` is what follows as backfill batches.
    """

    first_sequence: int
    sample_count: int
    _LAYOUT = struct.Struct("<II")

    def encode(self) -> bytes:
        return self._LAYOUT.pack(
            _u32(self.first_sequence, "first_sequence"), _u32(self.sample_count, "sample_count")
        )

    @classmethod
    def decode(cls, data: bytes) -> BackfillReply:
        _exact(data, cls._LAYOUT.size, "backfill reply")
        return cls(*cls._LAYOUT.unpack(data))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous device event; ``payload`` layout depends on ``code``."""

    event_sequence: int
    device_time_ms: int
    code: EventCode | int
    payload: bytes = b""

    def encode(self) -> bytes:
        return (
            _EVENT_HEADER.pack(
                MessageType.EVENT,
                self.event_sequence & 0xFFFF,
                _u32(self.device_time_ms, "device_time_ms"),
                int(self.code) & 0xFF,
            )
            + self.payload
        )

    @classmethod
    def decode(cls, data: bytes) -> Event:
        _require(data, _EVENT_HEADER.size, "event")
        message_type, seq, time_ms, code = _EVENT_HEADER.unpack_from(data)
        if message_type != MessageType.EVENT:
            raise InvalidFieldError(
                f"0x{message_type:02x} is not EVENT", what="event", field="type", data=data
            )
        return cls(seq, time_ms, enum_or_int(EventCode, code), bytes(data[_EVENT_HEADER.size :]))


_U8_U32: Final = struct.Struct("<BI")


@dataclass(frozen=True, slots=True)
class BootEvent:
    """``BOOT`` payload: why the device restarted, and how far its last boot counted.

    Layout: empty (nothing known), or u8 :class:`ResetReason`, optionally followed by u32
    ``previous_sequence_end``: the number of samples the previous boot took (the sequence
    its next sample would have had, modulo 2**32), when the firmware still knows it (kept
    in RAM that survives a warm reset, or saved at an orderly power-off). Longer payloads
    carry fields a receiver does not know yet and are read as far as known.
    """

    reset_reason: ResetReason | int | None = None
    previous_sequence_end: int | None = None

    def encode(self) -> bytes:
        if self.reset_reason is None:
            if self.previous_sequence_end is not None:
                raise EncodeError("BOOT: previous_sequence_end needs a reset_reason")
            return b""
        reason = int(self.reset_reason) & 0xFF
        if self.previous_sequence_end is None:
            return bytes([reason])
        return _U8_U32.pack(reason, _u32(self.previous_sequence_end, "previous_sequence_end"))

    @classmethod
    def decode(cls, payload: bytes) -> BootEvent:
        if not payload:
            return cls()
        reason = enum_or_int(ResetReason, payload[0])
        if len(payload) == 1:
            return cls(reason)
        _require(payload, _U8_U32.size, "BOOT payload")
        return cls(reason, _U8_U32.unpack_from(payload)[1])


@dataclass(frozen=True, slots=True)
class ShutdownEvent:
    """``SHUTDOWN`` payload: u8 :class:`ShutdownReason`, optionally u32 ``sequence_end``.

    ``sequence_end``: the number of samples this boot took (the sequence its next sample
    would have had, modulo 2**32), so that a host can count the samples it never got.
    """

    reason: ShutdownReason | int
    sequence_end: int | None = None

    def encode(self) -> bytes:
        reason = int(self.reason) & 0xFF
        if self.sequence_end is None:
            return bytes([reason])
        return _U8_U32.pack(reason, _u32(self.sequence_end, "sequence_end"))

    @classmethod
    def decode(cls, payload: bytes) -> ShutdownEvent:
        _require(payload, 1, "SHUTDOWN payload")
        reason = enum_or_int(ShutdownReason, payload[0])
        if len(payload) == 1:
            return cls(reason)
        _require(payload, _U8_U32.size, "SHUTDOWN payload")
        return cls(reason, _U8_U32.unpack_from(payload)[1])


# --------------------------------------------------------------------------- program chunks


@dataclass(frozen=True, slots=True)
class ProgramChunk:
    """One piece of a program transfer, written to the program characteristic."""

    transfer_id: int
    offset: int
    data: bytes

    def encode(self) -> bytes:
        return (
            _PROGRAM_CHUNK_HEADER.pack(
                MessageType.PROGRAM_CHUNK,
                _u16(self.transfer_id, "transfer_id"),
                _u32(self.offset, "offset"),
            )
            + self.data
        )

    @classmethod
    def decode(cls, data: bytes) -> ProgramChunk:
        _require(data, _PROGRAM_CHUNK_HEADER.size, "program chunk")
        message_type, transfer_id, offset = _PROGRAM_CHUNK_HEADER.unpack_from(data)
        if message_type != MessageType.PROGRAM_CHUNK:
            raise InvalidFieldError(
                f"0x{message_type:02x} is not PROGRAM_CHUNK",
                what="program chunk",
                field="type",
                data=data,
            )
        return cls(transfer_id, offset, bytes(data[_PROGRAM_CHUNK_HEADER.size :]))


# --------------------------------------------------------------------------- device profile


def _encode_string(value: str, name: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_STRING_BYTES:
        raise EncodeError(f"{name} is {len(raw)} bytes of UTF-8; at most {MAX_STRING_BYTES}")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What a device is and can do: read from the profile characteristic or ``GET_INFO``."""

    protocol_version: int
    device_kind: DeviceKind | int
    capabilities: Capability
    sample_rate_hz: int
    ring_capacity_samples: int
    serial_number: str
    model_number: str
    firmware_revision: str
    hardware_revision: str = ""
    manufacturer_name: str = ""
    _FIXED = struct.Struct("<BBIHI")
    _STRING_FIELDS = (
        "serial_number",
        "model_number",
        "firmware_revision",
        "hardware_revision",
        "manufacturer_name",
    )

    def encode(self) -> bytes:
        fixed = self._FIXED.pack(
            self.protocol_version & 0xFF,
            int(self.device_kind) & 0xFF,
            _u32(int(self.capabilities), "capabilities"),
            _u16(self.sample_rate_hz, "sample_rate_hz"),
            _u32(self.ring_capacity_samples, "ring_capacity_samples"),
        )
        strings = b"".join(_encode_string(getattr(self, n), n) for n in self._STRING_FIELDS)
        return fixed + strings

    @classmethod
    def decode(cls, data: bytes) -> DeviceProfile:
        what = "device profile"
        _require(data, cls._FIXED.size, what)
        version, kind, caps, rate_hz, ring = cls._FIXED.unpack_from(data)
        if rate_hz == 0:
            raise InvalidFieldError(
                "must be positive", what=what, field="sample_rate_hz", data=data
            )
        offset = cls._FIXED.size
        strings: list[str] = []
        for name in cls._STRING_FIELDS:
            _require(data, offset + 1, what)
            length = data[offset]
            offset += 1
            _require(data, offset + length, what)
            try:
                strings.append(bytes(data[offset : offset + length]).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidFieldError(
                    f"not UTF-8 ({exc.reason})", what=what, field=name, data=data
                ) from exc
            offset += length
        if offset != len(data):
            raise FrameError(
                f"{len(data) - offset} unexpected trailing bytes", what=what, data=data
            )
        return cls(
            version,
            enum_or_int(DeviceKind, kind),
            Capability(caps),
            rate_hz,
            ring,
            *strings,
        )

    @property
    def is_supported_version(self) -> bool:
        return self.protocol_version == PROTOCOL_VERSION


Message: TypeAlias = Command | Ack | Event | ProgramChunk
