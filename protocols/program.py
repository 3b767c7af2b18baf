"""Device programs: a routine in a compact binary form that a microcontroller runs by itself.

The host sends the encoded bytes with ``PROGRAM_BEGIN`` / program chunks / ``PROGRAM_COMMIT``
(``docs/protocol.md`` section 7, which is the normative layout) and starts it with
``PROGRAM_START``. The device then runs every step on its own clock and enforces the hard
limits carried in the header, so a routine ends safely when the host sleeps or the link
drops.

Every field holds the wire unit named in it (``contact_time_ds`` is in 0.1 s,
``pressure_cap_dapa`` in 10 Pa, ``red_centi_mw_cm2`` in 0.01 mW/cm²), so that a program
survives an encode/decode round trip exactly and the firmware never needs floating point.
:meth:`Program.decode` raises only :class:`~protocols.errors.ProtocolError` subclasses,
whatever bytes it is given.

This module also defines the payloads of the events a device sends while it runs a
program (``PROGRAM_STEP``, ``PROGRAM_FINISHED``, ``HARD_LIMIT``) and of a refused
``PROGRAM_COMMIT`` acknowledgement.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from typing import Final, NoReturn, TypeAlias

from protocols.constants import (
    CENTI_C_PER_C,
    DAPA_PER_KPA,
    DECI_HZ_PER_HZ,
    DS_PER_S,
    MAX_INTENSITY_LEVEL,
    MAX_PROGRAM_STEPS,
    U16_MAX,
    DeviceKind,
    MassageMode,
    Zone,
    enum_or_int,
)
from protocols.errors import EncodeError, FrameError, InvalidFieldError, TruncatedFrameError

PROGRAM_MAGIC: Final = b"OFPG"
PROGRAM_FORMAT_VERSION: Final = 1
# Header: magic, version, device kind, step count, flags (reserved 0),
# session length cap s, skin temperature stop 0.01 degC, no-contact pause 0.1 s, reserved.
_HEADER: Final = struct.Struct("<4sBBBBHhHH")
# Massage step: zone, mode, intensity, reserved, contact time 0.1 s, band min, band max, cap.
_MASSAGE_STEP: Final = struct.Struct("<BBBBHHHH")
# LED step: red, near-infrared, blue irradiance, duration s, pulse 0.1 Hz, three dose caps.
_LED_STEP: Final = struct.Struct("<HHHHHHHH")
HEADER_BYTES: Final = _HEADER.size
MASSAGE_STEP_BYTES: Final = _MASSAGE_STEP.size
LED_STEP_BYTES: Final = _LED_STEP.size
MAX_PROGRAM_BYTES: Final = HEADER_BYTES + MAX_PROGRAM_STEPS * max(
    MASSAGE_STEP_BYTES, LED_STEP_BYTES
)


_U8_MAX: Final = 0xFF
_I16_MIN: Final = -0x8000
_I16_MAX: Final = 0x7FFF
_U32_MAX: Final = 0xFFFF_FFFF
_U32: Final = struct.Struct("<I")
_WHAT: Final = "program"

LED_CHANNEL_NAMES: Final = ("red", "near_infrared", "blue")


def program_crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC of a program's bytes (as ``PROGRAM_BEGIN`` carries it)."""
    return zlib.crc32(data) & 0xFFFF_FFFF


class ProgramStepReason(enum.IntEnum):
    """Second byte of ``PROGRAM_STEP``: why the device (re)entered the step it names."""

    STARTED = 0  # PROGRAM_START: the first step begins
    STEP_DONE = 1  # the previous step's time was done
    OVER_TEMPERATURE = 2  # the previous step ended at the temperature stop
    DOSE_CAP = 3  # the previous step ended with every lit channel at its dose cap
    RESUMED = 4  # actuators back on after a hard-limit stop or a pause (same step)
    PAUSED = 5  # actuators off: no contact (massager) or not worn (mask) for too long


class ProgramEndReason(enum.IntEnum):
    """Payload of ``PROGRAM_FINISHED``: ``TREATMENT_FINISHED`` reasons plus the session cap."""

    COMPLETED = 0
    STOPPED_BY_HOST = 1  # PROGRAM_ABORT, STOP_ALL, STOP_LED
    OVER_TEMPERATURE = 2  # the last step ended at the temperature stop
    HARD_LIMIT = 3  # pressure above the cap too many times, or every dose cap reached
    LOW_BATTERY = 4
    BUTTON = 5
    SESSION_CAP = 6  # the program ran for the header's session length cap


class HardLimit(enum.IntEnum):
    """First byte of ``HARD_LIMIT`` while a program runs: which device limit acted."""

    PRESSURE_CAP = 1  # motor stopped at once; resumes when back in band
    SESSION_LENGTH = 2
    # 3 is reserved: the temperature stop is reported with OVER_TEMPERATURE.
    DOSE_CAP_RED = 4  # the channel stays off for the rest of the program
    DOSE_CAP_NEAR_INFRARED = 5
    DOSE_CAP_BLUE = 6


DOSE_CAP_LIMITS: Final = (
    HardLimit.DOSE_CAP_RED,
    HardLimit.DOSE_CAP_NEAR_INFRARED,
    HardLimit.DOSE_CAP_BLUE,
)


class ProgramRejectReason(enum.IntEnum):
    """First byte of a refused ``PROGRAM_COMMIT`` acknowledgement's payload."""

    NO_TRANSFER = 1  # no PROGRAM_BEGIN, or another transfer id
    INCOMPLETE = 2  # bytes missing; detail = first missing offset
    CRC_MISMATCH = 3  # detail = CRC-32 of the bytes received
    MALFORMED = 4  # the bytes do not decode as a program
    WRONG_DEVICE_KIND = 5  # a program for another kind of device
    CHUNK_REFUSED = 6  # a chunk fell beyond total_bytes; detail = its offset
    HARDWARE_LIMIT = 7  # beyond what this device can do (result LIMIT_EXCEEDED)


# --------------------------------------------------------------------------- helpers


def _check_range(value: int, low: int, high: int, field: str, *, decoding: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        message = f"{value!r} outside {low}..{high}"
        if decoding:
            raise InvalidFieldError(message, what=_WHAT, field=field)
        raise EncodeError(f"program field {field!r}: {message}")


def _fail(message: str, field: str, *, decoding: bool) -> NoReturn:
    if decoding:
        raise InvalidFieldError(message, what=_WHAT, field=field)
    raise EncodeError(f"program field {field!r}: {message}")


# --------------------------------------------------------------------------- header


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramLimits:
    """The device-side hard limits of a program (from the host's safety policy)."""

    session_length_cap_s: int  # the program ends after this long, whatever happens
    skin_temperature_stop_centi_c: int  # the step ends at or above it
    no_contact_pause_ds: int  # off the skin (or mask not worn) this long: pause

    @property
    def skin_temperature_stop_c(self) -> float:
        return self.skin_temperature_stop_centi_c / CENTI_C_PER_C

    @property
    def no_contact_pause_s(self) -> float:
        return self.no_contact_pause_ds / DS_PER_S

    def validate(self, *, decoding: bool = False) -> None:
        _check_range(
            self.session_length_cap_s, 1, U16_MAX, "session_length_cap_s", decoding=decoding
        )
        _check_range(
            self.skin_temperature_stop_centi_c,
            _I16_MIN,
            _I16_MAX,
            "skin_temperature_stop_centi_c",
            decoding=decoding,
        )
        _check_range(self.no_contact_pause_ds, 1, U16_MAX, "no_contact_pause_ds", decoding=decoding)


# --------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True, slots=True)
class MassageProgramStep:
    """One zone: settings, effective contact time and the pressure limits under the head."""

    zone: Zone
    mode: MassageMode
    intensity: int  # 1..10
    contact_time_ds: int  # effective time on the skin, 0.1 s
    pressure_min_dapa: int  # step band, 10 Pa
    pressure_max_dapa: int
    pressure_cap_dapa: int  # the zone's cap: above it the motor stops at once

    @property
    def contact_time_s(self) -> float:
        return self.contact_time_ds / DS_PER_S

    @property
    def pressure_cap_kpa(self) -> float:
        return self.pressure_cap_dapa / DAPA_PER_KPA

    def validate(self, *, decoding: bool = False, where: str = "") -> None:
        """Raise :class:`EncodeError` (or :class:`InvalidFieldError` when decoding)."""
        if not isinstance(self.zone, Zone) or self.zone is Zone.NONE:
            _fail(f"{self.zone!r} is not a facial zone", where + "zone", decoding=decoding)
        if not isinstance(self.mode, MassageMode) or self.mode is MassageMode.OFF:
            _fail(
                f"{self.mode!r} is not vibration, percussion or pulse",
                where + "mode",
                decoding=decoding,
            )
        _check_range(self.intensity, 1, MAX_INTENSITY_LEVEL, where + "intensity", decoding=decoding)
        _check_range(self.contact_time_ds, 1, U16_MAX, where + "contact_time_ds", decoding=decoding)
        for name in ("pressure_min_dapa", "pressure_max_dapa", "pressure_cap_dapa"):
            _check_range(getattr(self, name), 0, U16_MAX, where + name, decoding=decoding)
        if not self.pressure_min_dapa < self.pressure_max_dapa <= self.pressure_cap_dapa:
            _fail(
                f"needs band min {self.pressure_min_dapa} < band max {self.pressure_max_dapa}"
                f" <= cap {self.pressure_cap_dapa}",
                where + "pressure_max_dapa",
                decoding=decoding,
            )

    def encode(self) -> bytes:
        return _MASSAGE_STEP.pack(
            int(self.zone),
            int(self.mode),
            self.intensity,
            0,
            self.contact_time_ds,
            self.pressure_min_dapa,
            self.pressure_max_dapa,
            self.pressure_cap_dapa,
        )

    @classmethod
    def decode(cls, data: bytes, index: int) -> MassageProgramStep:
        where = f"steps[{index}]."
        zone, mode, intensity, reserved, contact, low, high, cap = _MASSAGE_STEP.unpack(data)
        if reserved:
            _fail(f"is {reserved}, must be 0", where + "reserved", decoding=True)
        typed_zone = enum_or_int(Zone, zone)
        if not isinstance(typed_zone, Zone):
            _fail(f"unknown zone {zone}", where + "zone", decoding=True)
        typed_mode = enum_or_int(MassageMode, mode)
        if not isinstance(typed_mode, MassageMode):
            _fail(f"unknown mode {mode}", where + "mode", decoding=True)
        step = cls(typed_zone, typed_mode, intensity, contact, low, high, cap)
        step.validate(decoding=True, where=where)
        return step


@dataclasses.dataclass(frozen=True, slots=True)
class LedProgramStep:
    """One light step: irradiance per channel, duration, pulse and per-channel dose caps.

    A dose cap is the most that channel may have delivered since the program started
    (J/cm², cumulative over the steps): at the cap the device turns the channel off for
    the rest of the program.
    """

    red_centi_mw_cm2: int
    near_infrared_centi_mw_cm2: int
    blue_centi_mw_cm2: int
    duration_s: int
    pulse_deci_hz: int  # 0: continuous
    red_dose_cap_centi_j_cm2: int
    near_infrared_dose_cap_centi_j_cm2: int
    blue_dose_cap_centi_j_cm2: int

    def irradiance_centi_mw_cm2(self, channel: int) -> int:
        """Channel 0 red, 1 near-infrared, 2 blue."""
        return (self.red_centi_mw_cm2, self.near_infrared_centi_mw_cm2, self.blue_centi_mw_cm2)[
            channel
        ]

    def dose_cap_centi_j_cm2(self, channel: int) -> int:
        return (
            self.red_dose_cap_centi_j_cm2,
            self.near_infrared_dose_cap_centi_j_cm2,
            self.blue_dose_cap_centi_j_cm2,
        )[channel]

    @property
    def pulse_hz(self) -> float:
        return self.pulse_deci_hz / DECI_HZ_PER_HZ

    def _values(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def validate(self, *, decoding: bool = False, where: str = "") -> None:
        """Raise :class:`EncodeError` (or :class:`InvalidFieldError` when decoding)."""
        for f in dataclasses.fields(self):
            _check_range(getattr(self, f.name), 0, U16_MAX, where + f.name, decoding=decoding)
        if self.duration_s == 0:
            _fail("must be at least 1 s", where + "duration_s", decoding=decoding)
        if not any(self.irradiance_centi_mw_cm2(ch) for ch in range(len(LED_CHANNEL_NAMES))):
            _fail("no channel is lit", where + "red_centi_mw_cm2", decoding=decoding)

    def encode(self) -> bytes:
        return _LED_STEP.pack(*self._values())

    @classmethod
    def decode(cls, data: bytes, index: int) -> LedProgramStep:
        step = cls(*_LED_STEP.unpack(data))
        step.validate(decoding=True, where=f"steps[{index}].")
        return step


ProgramStep: TypeAlias = MassageProgramStep | LedProgramStep
_STEP_TYPES: Final[dict[DeviceKind, type[MassageProgramStep] | type[LedProgramStep]]] = {
    DeviceKind.MASSAGER: MassageProgramStep,
    DeviceKind.LED_MASK: LedProgramStep,
}
_STEP_BYTES: Final = {DeviceKind.MASSAGER: MASSAGE_STEP_BYTES, DeviceKind.LED_MASK: LED_STEP_BYTES}


# --------------------------------------------------------------------------- program


@dataclasses.dataclass(frozen=True, slots=True)
class Program:
    """A whole device program: the kind it is for, its hard limits and 1..64 steps."""

    device_kind: DeviceKind
    limits: ProgramLimits
    steps: tuple[ProgramStep, ...]

    def validate(self, *, decoding: bool = False) -> None:
        kind: object = self.device_kind  # callers without type checking may pass anything
        if not isinstance(kind, DeviceKind):
            _fail(f"unknown device kind {kind!r}", "device_kind", decoding=decoding)
        self.limits.validate(decoding=decoding)
        if not 1 <= len(self.steps) <= MAX_PROGRAM_STEPS:
            _fail(
                f"{len(self.steps)} steps, need 1..{MAX_PROGRAM_STEPS}", "steps", decoding=decoding
            )
        expected = _STEP_TYPES[self.device_kind]
        for index, step in enumerate(self.steps):
            if not isinstance(step, expected):
                _fail(
                    f"a {type(step).__name__} in a {self.device_kind.name} program",
                    f"steps[{index}]",
                    decoding=decoding,
                )
            step.validate(decoding=decoding, where=f"steps[{index}].")

    @property
    def encoded_size(self) -> int:
        return HEADER_BYTES + len(self.steps) * _STEP_BYTES[self.device_kind]

    def encode(self) -> bytes:
        """The program's bytes; raises :class:`EncodeError` for an invalid program."""
        self.validate()
        header = _HEADER.pack(
            PROGRAM_MAGIC,
            PROGRAM_FORMAT_VERSION,
            int(self.device_kind),
            len(self.steps),
            0,
            self.limits.session_length_cap_s,
            self.limits.skin_temperature_stop_centi_c,
            self.limits.no_contact_pause_ds,
            0,
        )
        return header + b"".join(step.encode() for step in self.steps)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Program:
        raw = bytes(data)
        if len(raw) < HEADER_BYTES:
            raise TruncatedFrameError(what=_WHAT, needed=HEADER_BYTES, got=len(raw), data=raw)
        (magic, version, kind, count, flags, cap_s, stop_centi_c, pause_ds, reserved) = (
            _HEADER.unpack_from(raw)
        )
        if magic != PROGRAM_MAGIC:
            raise InvalidFieldError(
                f"{magic!r} is not {PROGRAM_MAGIC!r}", what=_WHAT, field="magic", data=raw
            )
        if version != PROGRAM_FORMAT_VERSION:
            raise InvalidFieldError(
                f"format version {version} is not supported (only {PROGRAM_FORMAT_VERSION})",
                what=_WHAT,
                field="version",
                data=raw,
            )
        device_kind = enum_or_int(DeviceKind, kind)
        if not isinstance(device_kind, DeviceKind):
            raise InvalidFieldError(
                f"unknown device kind {kind}", what=_WHAT, field="device_kind", data=raw
            )
        if flags or reserved:
            raise InvalidFieldError(
                "reserved header fields must be 0", what=_WHAT, field="flags", data=raw
            )
        if not 1 <= count <= MAX_PROGRAM_STEPS:
            raise InvalidFieldError(
                f"{count} steps, need 1..{MAX_PROGRAM_STEPS}",
                what=_WHAT,
                field="step_count",
                data=raw,
            )
        step_bytes = _STEP_BYTES[device_kind]
        needed = HEADER_BYTES + count * step_bytes
        if len(raw) < needed:
            raise TruncatedFrameError(what=_WHAT, needed=needed, got=len(raw), data=raw)
        if len(raw) != needed:
            raise FrameError(f"{len(raw) - needed} bytes after the last step", what=_WHAT, data=raw)
        limits = ProgramLimits(cap_s, stop_centi_c, pause_ds)
        limits.validate(decoding=True)
        step_type = _STEP_TYPES[device_kind]
        steps = tuple(
            step_type.decode(raw[offset : offset + step_bytes], index)
            for index, offset in enumerate(range(HEADER_BYTES, needed, step_bytes))
        )
        return cls(device_kind, limits, steps)


# --------------------------------------------------------------------------- payloads


def _at_least(payload: bytes, size: int, what: str) -> None:
    # Trailing fields may be added within protocol version 1 (section 9): they are ignored.
    if len(payload) < size:
        raise TruncatedFrameError(what=what, needed=size, got=len(payload), data=payload)


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramStepEvent:
    """``PROGRAM_STEP`` payload: u8 step index (0-based), u8 :class:`ProgramStepReason`,
    then, with reason STARTED, u32 the CRC-32 of the program that started (section 7.4):
    a host tells which program a device started by itself (its button) from it."""

    step_index: int
    reason: ProgramStepReason | int
    program_crc32: int | None = None

    def encode(self) -> bytes:
        _check_range(self.step_index, 0, _U8_MAX, "step_index", decoding=False)
        head = bytes([self.step_index, int(self.reason) & _U8_MAX])
        if self.program_crc32 is None:
            return head
        _check_range(self.program_crc32, 0, _U32_MAX, "program_crc32", decoding=False)
        return head + _U32.pack(self.program_crc32)

    @classmethod
    def decode(cls, payload: bytes) -> ProgramStepEvent:
        _at_least(payload, 2, "PROGRAM_STEP payload")
        crc = _U32.unpack_from(payload, 2)[0] if len(payload) >= 2 + _U32.size else None
        return cls(payload[0], enum_or_int(ProgramStepReason, payload[1]), crc)


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramFinishedEvent:
    """``PROGRAM_FINISHED`` payload: u8 :class:`ProgramEndReason`."""

    reason: ProgramEndReason | int

    def encode(self) -> bytes:
        return bytes([int(self.reason) & _U8_MAX])

    @classmethod
    def decode(cls, payload: bytes) -> ProgramFinishedEvent:
        _at_least(payload, 1, "PROGRAM_FINISHED payload")
        return cls(enum_or_int(ProgramEndReason, payload[0]))


@dataclasses.dataclass(frozen=True, slots=True)
class HardLimitEvent:
    """``HARD_LIMIT`` payload while a program runs: u8 :class:`HardLimit`, u8 step index."""

    limit: HardLimit | int
    step_index: int

    def encode(self) -> bytes:
        _check_range(self.step_index, 0, _U8_MAX, "step_index", decoding=False)
        return bytes([int(self.limit) & _U8_MAX, self.step_index])

    @classmethod
    def decode(cls, payload: bytes) -> HardLimitEvent:
        _at_least(payload, 2, "HARD_LIMIT payload")
        return cls(enum_or_int(HardLimit, payload[0]), payload[1])


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramRejection:
    """Payload of a refused ``PROGRAM_COMMIT`` ack: u8 reason, u32 detail (see the reason)."""

    reason: ProgramRejectReason | int
    detail: int = 0
    _LAYOUT = struct.Struct("<BI")

    def encode(self) -> bytes:
        if not 0 <= self.detail <= 0xFFFF_FFFF:
            raise EncodeError(f"detail={self.detail} does not fit in an unsigned 32-bit field")
        return self._LAYOUT.pack(int(self.reason) & _U8_MAX, self.detail)

    @classmethod
    def decode(cls, payload: bytes) -> ProgramRejection:
        _at_least(payload, cls._LAYOUT.size, "PROGRAM_COMMIT rejection")
        reason, detail = cls._LAYOUT.unpack_from(payload)
        return cls(enum_or_int(ProgramRejectReason, reason), detail)
