"""The transport seam: what a device session needs from a link, whatever carries it.

A session does not care whether messages travel over GATT notifications or a
serial line; like smpclient's ``SMPTransport`` this is a :class:`typing.Protocol`
that each link implements.

It is also the seam of device families (the device catalogue): each family's **driver**
is a transport. The session speaks the bridge's device model, the OFCP command set
(connect, set mode, zone and intensity, stop, start and stop light, telemetry and events
where the device has them, its profile and battery in :class:`DeviceInfo`); an OFCP
device understands it as it is (``ble.BleTransport``, ``serial.SerialTransport``), and
another family's driver carries each command to that family's wire and hands back the
acknowledgement (``foreo.ForeoTransport``). Everything above the session is family-blind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from devicebridge.core.catalogue import KindSupport
from protocols import DeviceKind, DeviceProfile, FrameError

MessageReceiver = Callable[[bytes], None]
LinkLostReceiver = Callable[[], None]
MalformedReceiver = Callable[[FrameError], None]

# Command id a transport may use for its own requests (serial GET_INFO); sessions
# never allocate it, so the transport can take that acknowledgement for itself.
TRANSPORT_COMMAND_ID: Final = 0xFFFF


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Identity and state of a connected device."""

    serial_number: str
    model_number: str
    firmware_revision: str
    hardware_revision: str
    manufacturer_name: str
    battery_percent: int | None
    profile: DeviceProfile
    # What the driver knows the device can do, where the profile's flags cannot say it all
    # (a catalogue family's declared support); None: read it from the profile's flags.
    support: KindSupport | None = None

    @property
    def kind(self) -> DeviceKind | int:
        return self.profile.device_kind


class Transport(Protocol):
    """One link to one device. Callbacks are plain functions called on the event loop.

    Optional: ``write_control_nowait(data: bytes) -> None``, the write of
    :meth:`write_control` done synchronously (serial has it; a bleak write is a coroutine).
    :meth:`devicebridge.device.session.DeviceSession.send_soon` uses it when present.
    """

    @property
    def description(self) -> str:
        """Where the device is, for messages: ``"BLE AA:BB:.."`` or ``"serial /dev/ttyUSB0"``."""
        ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def max_message_bytes(self) -> int:
        """Largest message the link carries in one piece (ATT MTU - 3 on BLE)."""
        ...

    def set_receivers(
        self,
        on_message: MessageReceiver,
        on_link_lost: LinkLostReceiver,
        on_malformed: MalformedReceiver | None = None,
    ) -> None:
        """Register where received messages, an unexpected link loss and bad frames go."""
        ...

    async def wait_for_device(self, timeout_s: float) -> None:
        """Return once the device can be connected (it advertises, the port exists).

        Raises :class:`devicebridge.errors.DeviceNotFoundError` after ``timeout_s``.
        """
        ...

    async def connect(self) -> None:
        """Connect and enable every notification (again after each reconnect)."""
        ...

    async def disconnect(self) -> None:
        """Close the link on purpose; ``on_link_lost`` is not called."""
        ...

    async def write_control(self, data: bytes) -> None:
        """Send one command message to the device."""
        ...

    @property
    def max_program_chunk_bytes(self) -> int:
        """Largest program chunk message (header included) that one write carries."""
        ...

    async def write_program_chunk(self, data: bytes) -> None:
        """Send one program chunk message (BLE: the Program Transfer characteristic)."""
        ...

    async def read_device_info(self) -> DeviceInfo: ...
