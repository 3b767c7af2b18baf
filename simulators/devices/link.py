"""The seam between a device model and the transport that carries its messages.

A device model never knows whether it talks over BLE (the bleak backend) or a
serial line (the pty): it hands messages to a :class:`DeviceLink` with the
logical path they belong to, and the link decides what that means on its
medium (a notification on a characteristic, or a serial frame).

Between the device and its link, :class:`LinkLayer` s made by link wrappers
(:meth:`simulators.devices.device.SimulatedDevice.add_link_wrapper`) may change what goes
through: a lossy radio, a slow line (:class:`simulators.faults.link.FaultyLink`). A link
that carries serial frames (the pty and TCP ports) also has ``send_frame(channel,
frame)`` (:class:`FramedLink`), so that a layer can damage the frame bytes themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
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


class FramedLink(DeviceLink, Protocol):
    """A link that carries serial frames (COBS + CRC, docs/protocol.md section 8)."""

    def send_frame(self, channel: Channel, frame: bytes) -> None:
        """Write one already encoded (possibly damaged) frame."""
        ...


class LinkLayer(DeviceLink, Protocol):
    """A layer a link wrapper puts between a device and its link."""

    def detached(self) -> None:
        """The device let go of the link, or the layer was removed: what the layer holds
        back is lost and it sends nothing more."""
        ...


LinkWrapper = Callable[[DeviceLink], LinkLayer]
"""``wrapper(link) -> layer``: what a device sends through instead of ``link`` (itself a
link, or the layer of a wrapper added earlier)."""
