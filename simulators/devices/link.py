"""The seam between a device model and the transport that carries its messages.

A device model never knows whether it talks over BLE (the bleak backend) or a
serial line (the pty): it hands messages to a :class:`DeviceLink` with the
logical path they belong to, and the link decides what that means on its
medium (a notification on a characteristic, or a serial frame).
"""

from __future__ import annotations

import enum
from typing import Protocol


class Channel(enum.Enum):
    """Logical message paths; on BLE each is one characteristic."""

    CONTROL = "control"  # acks (device -> host), commands (host -> device)
    TELEMETRY = "telemetry"
    EVENTS = "events"
    PROGRAM = "program"
    BATTERY = "battery"  # Battery Level notifications (BLE only)
    SMP = "smp"  # MCUmgr/SMP requests and responses (simulators.smp)


class DeviceLink(Protocol):
    """What a connected transport offers a device model."""

    @property
    def max_payload_bytes(self) -> int:
        """Largest message the link carries in one piece (ATT MTU - 3 on BLE)."""
        ...

    def send(self, channel: Channel, message: bytes) -> None:
        """Deliver ``message`` on ``channel``; never blocks, may drop (then counts it)."""
        ...

    def device_closed(self) -> None:
        """The device ended the link (it powered off); already detached from the device."""
        ...
