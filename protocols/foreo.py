"""The FOREO family's control packet, as far as it is public.

Pure. What is public about FOREO devices (LUNA cleansers, UFO masks, BEAR, KIWI) comes from
one place, Buttplug's device configuration (github.com/buttplugio/buttplug, BSD 3-Clause:
``device-config-v4/protocols/foreo.yml`` and ``protocol_impl/foreo.rs``): one vibration
output, driven by writing, **with response**, the three bytes ``[0x01, mode, speed]`` to
characteristic ``0000fff1-...`` of service ``0000fff0-...``, with ``speed`` a step 0-10
(0 off) and ``mode`` a byte chosen by the advertised name. Nothing else is public: no
telemetry, no pressure or contact, no LED or heat control. None of it has been checked on
hardware here; ``docs/devices.md`` says how to report a device that differs.

The host's driver (:mod:`devicebridge.device.transport.foreo`) and the simulated device
(:mod:`simulators.devices.foreo`) both read packets through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocols.constants import sig_uuid
from protocols.errors import EncodeError, FrameError, InvalidFieldError

FOREO_SERVICE_UUID: Final = sig_uuid(0xFFF0)
FOREO_CONTROL_CHAR_UUID: Final = sig_uuid(0xFFF1)  # written with response
VIBRATE_PACKET_TYPE: Final = 0x01
VIBRATE_PACKET_BYTES: Final = 3
MAX_SPEED: Final = 10  # Buttplug's vibrate range for every FOREO model: steps 0..10
MAX_MODE_BYTE: Final = 0xFF


@dataclass(frozen=True, slots=True)
class VibratePacket:
    """``[0x01, mode, speed]``: run the vibration at ``speed`` (0: off)."""

    mode: int
    speed: int

    def encode(self) -> bytes:
        if not 0 <= self.mode <= MAX_MODE_BYTE:
            raise EncodeError(f"FOREO packet: mode must be 0..{MAX_MODE_BYTE}, got {self.mode}")
        if not 0 <= self.speed <= MAX_SPEED:
            raise EncodeError(f"FOREO packet: speed must be 0..{MAX_SPEED}, got {self.speed}")
        return bytes((VIBRATE_PACKET_TYPE, self.mode, self.speed))

    @classmethod
    def decode(cls, data: bytes) -> VibratePacket:
        what = "FOREO packet"
        if len(data) != VIBRATE_PACKET_BYTES:
            raise FrameError(
                f"{len(data)} bytes, a vibrate packet has {VIBRATE_PACKET_BYTES}",
                what=what,
                data=data,
            )
        if data[0] != VIBRATE_PACKET_TYPE:
            raise InvalidFieldError(
                f"0x{data[0]:02x}, not 0x{VIBRATE_PACKET_TYPE:02x}",
                what=what,
                field="type",
                data=data,
            )
        if data[2] > MAX_SPEED:
            raise InvalidFieldError(
                f"{data[2]} is above {MAX_SPEED}", what=what, field="speed", data=data
            )
        return cls(data[1], data[2])


def mode_byte_for_name(advertised_name: str) -> int:
    """The mode byte Buttplug's FOREO driver sends for a device advertising this name.

    Its rule, on the lower-cased name: 3 when it contains ``smart`` and ``2`` (LUNA play
    smart 2), 1 when it contains ``fofo`` or ``ufo``, else 0. The device catalogue states
    the byte of every listed name (``devicebridge/data/devices/foreo.toml``); this rule is
    what a test checks the catalogue against.
    """
    name = advertised_name.casefold()
    if "smart" in name and "2" in name:
        return 3
    if "fofo" in name or "ufo" in name:
        return 1
    return 0
