"""Identifiers of the Open Facial Care Profile (OFCP): UUIDs, codes and enums.

Unknown codes received from a device decode to plain ``int`` values rather than
raising, so that a newer device does not crash an older host (see
:func:`enum_or_int`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, TypeVar

PROTOCOL_VERSION: Final = 1

# 128-bit base for the profile's own UUIDs; the 16-bit part goes in bytes 2-3.
_BASE_UUID_TEMPLATE: Final = "f4ce{:04x}-8d1a-4b6e-9c2f-5a7e3b9d0c11"


def ofcp_uuid(short_id: int) -> str:
    """Full 128-bit UUID string of one of the profile's attributes."""
    return _BASE_UUID_TEMPLATE.format(short_id)


def sig_uuid(short_id: int) -> str:
    """Full UUID string of a Bluetooth SIG assigned 16-bit number."""
    return f"0000{short_id:04x}-0000-1000-8000-00805f9b34fb"


# The MCUmgr SMP GATT service and its one characteristic (write without response + notify),
# which devices with firmware updates expose beside the profile (Zephyr smp_bt).
SMP_SERVICE_UUID: Final = "8d53dc1d-1db7-4cd3-868b-8a527460aa84"
SMP_CHARACTERISTIC_UUID: Final = "da2e7828-fbce-4e01-ae9e-261174997c48"

FACIAL_CARE_SERVICE_UUID: Final = ofcp_uuid(0x0001)
DEVICE_PROFILE_CHAR_UUID: Final = ofcp_uuid(0x0002)  # read
CONTROL_CHAR_UUID: Final = ofcp_uuid(0x0003)  # write with response + notify (acks)
TELEMETRY_CHAR_UUID: Final = ofcp_uuid(0x0004)  # notify
EVENTS_CHAR_UUID: Final = ofcp_uuid(0x0005)  # notify
PROGRAM_CHAR_UUID: Final = ofcp_uuid(0x0006)  # write with response + notify

BATTERY_SERVICE_UUID: Final = sig_uuid(0x180F)
BATTERY_LEVEL_CHAR_UUID: Final = sig_uuid(0x2A19)
DEVICE_INFORMATION_SERVICE_UUID: Final = sig_uuid(0x180A)
MANUFACTURER_NAME_CHAR_UUID: Final = sig_uuid(0x2A29)
MODEL_NUMBER_CHAR_UUID: Final = sig_uuid(0x2A24)
SERIAL_NUMBER_CHAR_UUID: Final = sig_uuid(0x2A25)
HARDWARE_REVISION_CHAR_UUID: Final = sig_uuid(0x2A27)
FIRMWARE_REVISION_CHAR_UUID: Final = sig_uuid(0x2A26)
CLIENT_CHARACTERISTIC_CONFIG_UUID: Final = sig_uuid(0x2902)

# Bluetooth SIG company identifier 0xFFFF is reserved for tests and prototypes;
# a manufacturer ships its own assigned identifier in the same layout.
MANUFACTURER_ID: Final = 0xFFFF

ATT_DEFAULT_MTU: Final = 23
# Opcode (1 byte) and attribute handle (2 bytes): what a notification, a write command and a
# write request carry besides their value, so an ATT payload holds MTU - 3 bytes.
ATT_HEADER_BYTES: Final = 3
ATT_MAX_ATTRIBUTE_BYTES: Final = 512

# Wire units: every field of a command, a telemetry sample or a device program that carries a
# physical quantity carries it as an integer in one of these units.
DS_PER_S: Final = 10  # contact time and no-contact pause, 0.1 s
DAPA_PER_KPA: Final = 100  # pressure, 10 Pa
CENTI_C_PER_C: Final = 100  # temperature, 0.01 degC
CENTI_MW_CM2_PER_MW_CM2: Final = 100  # irradiance, 0.01 mW/cm2
DECI_HZ_PER_HZ: Final = 10  # pulse frequency, 0.1 Hz
CENTI_J_CM2_PER_J_CM2: Final = 100  # dose, 0.01 J/cm2
MJ_PER_J: Final = 1000  # dose J/cm2 = irradiance mW/cm2 x s / 1000
# Intensity levels of a massager's motor: 0 is off, 1..MAX_INTENSITY_LEVEL run it.
MAX_INTENSITY_LEVEL: Final = 10
# A device program (protocols.program): its steps at most, and the largest value of each of
# its unsigned 16-bit fields (what a limit in the units above can reach on the wire).
MAX_PROGRAM_STEPS: Final = 64
U16_MAX: Final = 0xFFFF


class MessageType(enum.IntEnum):
    """First byte of every message on the control, telemetry, events and program paths."""

    COMMAND = 0x01
    ACK = 0x02
    TELEMETRY = 0x10
    EVENT = 0x20
    PROGRAM_CHUNK = 0x30


class DeviceKind(enum.IntEnum):
    MASSAGER = 1
    LED_MASK = 2


class SampleFormat(enum.IntEnum):
    """Layout of one telemetry sample (the low nibble of byte 1 of a batch)."""

    MASSAGER_V1 = 1
    LED_MASK_V1 = 2


class Capability(enum.IntFlag):
    """Capability flags (u32) in the device profile."""

    PRESSURE_SENSOR = 1 << 0
    VIBRATION = 1 << 1
    PERCUSSION = 1 << 2
    CONTACT_SENSOR = 1 << 3
    SKIN_TEMPERATURE = 1 << 4
    LED_RED = 1 << 5
    LED_NEAR_INFRARED = 1 << 6
    LED_BLUE = 1 << 7
    BUTTONS = 1 << 8
    BACKFILL = 1 << 9
    PROGRAM_TRANSFER = 1 << 10
    AUTO_SHUTOFF = 1 << 11


class Zone(enum.IntEnum):
    """Facial zones, as carried in massager samples and zone commands."""

    NONE = 0
    FOREHEAD = 1
    EYE_AREA_LEFT = 2
    EYE_AREA_RIGHT = 3
    CHEEK_LEFT = 4
    CHEEK_RIGHT = 5
    NASOLABIAL_LEFT = 6
    NASOLABIAL_RIGHT = 7
    JAWLINE_LEFT = 8
    JAWLINE_RIGHT = 9
    CHIN = 10
    NECK = 11
    MASSETER_LEFT = 12
    MASSETER_RIGHT = 13


# Zone names as routines, policies and reports spell them (``Zone.CHEEK_LEFT`` -> ``cheek_left``).
ZONE_NAMES: Final[Mapping[int, str]] = {zone.value: zone.name.lower() for zone in Zone if zone}
ZONE_CODES: Final[Mapping[str, int]] = {name: code for code, name in ZONE_NAMES.items()}


def zone_named(name: str) -> Zone:
    """The zone a routine calls ``name`` (``cheek_left`` -> ``Zone.CHEEK_LEFT``), or KeyError."""
    return Zone(ZONE_CODES[name])


class MassageMode(enum.IntEnum):
    OFF = 0
    VIBRATION = 1
    PERCUSSION = 2
    PULSE = 3


class Opcode(enum.IntEnum):
    """Command opcodes written to the control characteristic."""

    GET_INFO = 0x01
    START_STREAM = 0x02
    STOP_STREAM = 0x03
    REQUEST_BACKFILL = 0x04
    PING = 0x05
    SET_INTENSITY = 0x10
    SET_MODE = 0x11
    SET_ZONE = 0x12
    START_LED = 0x20
    STOP_LED = 0x21
    PROGRAM_BEGIN = 0x30
    PROGRAM_COMMIT = 0x31
    PROGRAM_START = 0x32
    PROGRAM_ABORT = 0x33
    STOP_ALL = 0x7F


class ResultCode(enum.IntEnum):
    """Result of a command, carried in its acknowledgement."""

    OK = 0
    UNKNOWN_OPCODE = 1
    INVALID_PARAMETER = 2
    NOT_SUPPORTED = 3
    BUSY = 4
    DATA_UNAVAILABLE = 5
    LIMIT_EXCEEDED = 6
    MALFORMED = 7
    INTERNAL_ERROR = 8


class EventCode(enum.IntEnum):
    """Codes of asynchronous device events (events characteristic)."""

    BOOT = 0x01
    BUTTON = 0x02
    CONTACT_CHANGED = 0x03
    ZONE_CHANGED = 0x04
    BATTERY_LOW = 0x05
    SHUTDOWN = 0x06
    TREATMENT_STARTED = 0x10
    TREATMENT_FINISHED = 0x11
    OVER_TEMPERATURE = 0x12
    HARD_LIMIT = 0x13
    PROGRAM_STEP = 0x20
    PROGRAM_FINISHED = 0x21
    FAULT = 0x7F


class ResetReason(enum.IntEnum):
    """First payload byte of ``BOOT`` (an empty payload means unknown; see BootEvent)."""

    POWER_ON = 0
    WATCHDOG = 1
    BROWN_OUT = 2
    SOFTWARE = 3


class ButtonId(enum.IntEnum):
    """First payload byte of ``BUTTON``."""

    POWER = 1
    MODE = 2


class ButtonPress(enum.IntEnum):
    """Second payload byte of ``BUTTON``."""

    SHORT = 1
    LONG = 2


class ShutdownReason(enum.IntEnum):
    """Payload byte of ``SHUTDOWN``."""

    BATTERY_EMPTY = 0
    BUTTON = 1
    HOST = 2


class TreatmentEndReason(enum.IntEnum):
    """Payload byte of ``TREATMENT_FINISHED``."""

    COMPLETED = 0
    STOPPED_BY_HOST = 1
    OVER_TEMPERATURE = 2
    HARD_LIMIT = 3
    LOW_BATTERY = 4
    BUTTON = 5


E = TypeVar("E", bound=enum.IntEnum)


def enum_or_int(enum_type: type[E], value: int) -> E | int:
    """``enum_type(value)`` when defined, else the raw ``int`` (never raises)."""
    try:
        return enum_type(value)
    except ValueError:
        return value
