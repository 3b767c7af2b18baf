"""Manufacturer-specific advertising data, so a scan shows devices without connecting.

Layout of the manufacturer data (after the 16-bit company identifier, which
bleak strips into the dict key)::

    offset size field
    0      1    protocol version
    1      1    device kind
    2      1    battery percent (0..100, 0xFF unknown)
    3      1    flags: bit 0 busy (a treatment or program runs), bit 1 pairing mode
    4      n    serial number, ASCII, 1..16 bytes (identifies the device; addresses
                are not stable on every platform)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocols.constants import DeviceKind, enum_or_int
from protocols.errors import EncodeError, InvalidFieldError, TruncatedFrameError

_FIXED: Final = struct.Struct("<BBBB")
MAX_SERIAL_BYTES: Final = 16
BATTERY_UNKNOWN: Final = 0xFF
FLAG_BUSY: Final = 0x01
FLAG_PAIRING_MODE: Final = 0x02


@dataclass(frozen=True, slots=True)
class AdvertisedIdentity:
    protocol_version: int
    device_kind: DeviceKind | int
    battery_percent: int | None
    busy: bool
    pairing_mode: bool
    serial_number: str

    def encode(self) -> bytes:
        serial = self.serial_number.encode("ascii", errors="strict")
        if not 1 <= len(serial) <= MAX_SERIAL_BYTES:
            raise EncodeError(f"serial number must be 1..{MAX_SERIAL_BYTES} ASCII bytes")
        battery = BATTERY_UNKNOWN if self.battery_percent is None else self.battery_percent
        flags = (FLAG_BUSY if self.busy else 0) | (FLAG_PAIRING_MODE if self.pairing_mode else 0)
        return _FIXED.pack(self.protocol_version, int(self.device_kind), battery, flags) + serial

    @classmethod
    def decode(cls, data: bytes) -> AdvertisedIdentity:
        what = "manufacturer data"
        if len(data) < _FIXED.size + 1:
            raise TruncatedFrameError(what=what, needed=_FIXED.size + 1, got=len(data), data=data)
        version, kind, battery, flags = _FIXED.unpack_from(data)
        raw_serial = bytes(data[_FIXED.size :])
        if len(raw_serial) > MAX_SERIAL_BYTES or not raw_serial.isascii():
            raise InvalidFieldError(
                f"must be 1..{MAX_SERIAL_BYTES} ASCII bytes", what=what, field="serial", data=data
            )
        if battery != BATTERY_UNKNOWN and battery > 100:
            raise InvalidFieldError(f"{battery} > 100", what=what, field="battery", data=data)
        return cls(
            version,
            enum_or_int(DeviceKind, kind),
            None if battery == BATTERY_UNKNOWN else battery,
            bool(flags & FLAG_BUSY),
            bool(flags & FLAG_PAIRING_MODE),
            raw_serial.decode("ascii"),
        )
