"""One simulated device behind its own virtual Bluetooth controller.

The device model (a :class:`~simulators.devices.device.SimulatedDevice`, the same
object the in-process backend drives) reaches the air through the
:class:`~simulators.devices.link.DeviceLink` seam: a connection of the bumble GATT
server is its link, notifications go out as ATT Handle Value Notifications
(cut by bumble to ``ATT_MTU - 3``), and host writes arrive through the GATT
server's permission checks (the Control characteristic needs encryption).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from bumble import hci
from bumble.controller import Controller
from bumble.device import Connection, Device
from bumble.gatt import Characteristic
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from protocols.constants import ATT_HEADER_BYTES
from simulators.devices.device import MS_PER_S, SimulatedDevice
from simulators.devices.link import Channel
from simulators.linklevel.gatt import ENCRYPTED_CHAR_UUIDS, advertising_data, build_services
from simulators.linklevel.inflight import InFlight
from simulators.links.bleak_backend import CCCD_NOTIFY

_LOGGER = logging.getLogger(__name__)

# LE Data Length Extension: 251-byte link-layer payloads, so that one notification at
# MTU 247 is one ACL packet (bumble's default of 27 bytes cuts it into ten).
DLE_ACL_DATA_PACKET_BYTES: Final = 251


def virtual_controller(name: str, link: LocalLink) -> Controller:
    """A bumble controller on ``link`` with data length extension."""
    controller = Controller(name, link=link)
    controller.le_acl_data_packet_length = DLE_ACL_DATA_PACKET_BYTES
    return controller


class _GattLink:
    """The device's view of one connection (a :class:`~simulators.devices.link.DeviceLink`)."""

    def __init__(self, peripheral: LinkLevelPeripheral, connection: Connection) -> None:
        self.peripheral = peripheral
        self.connection = connection

    @property
    def max_payload_bytes(self) -> int:
        # The negotiated ATT MTU of this connection: 23 until the host exchanges it.
        return int(self.connection.att_mtu) - ATT_HEADER_BYTES

    def send(self, channel: Channel, message: bytes) -> None:
        self.peripheral.notify(self.connection, channel, message)

    def device_closed(self) -> None:
        self.peripheral.close_connection(
            self.connection,
            hci.HCI_ErrorCode.REMOTE_DEVICE_TERMINATED_CONNECTION_DUE_TO_POWER_OFF_ERROR,
        )


class LinkLevelPeripheral:
    """A bumble Device with a GATT server for one simulated device, on ``link``."""

    def __init__(
        self,
        device: SimulatedDevice,
        address: str,
        *,
        encrypted_uuids: frozenset[str] = ENCRYPTED_CHAR_UUIDS,
        in_flight: InFlight | None = None,
    ) -> None:
        self.device = device
        self.in_flight = in_flight or InFlight()
        self.address = address
        self.encrypted_uuids = encrypted_uuids
        self.controller: Controller | None = None
        self.bumble: Device | None = None
        self._characteristics: dict[Channel, Characteristic[bytes]] = {}
        self._connection: Connection | None = None
        self._link: _GattLink | None = None
        self._outbox: asyncio.Queue[tuple[Connection, Characteristic[bytes], bytes]] = (
            asyncio.Queue()
        )
        self._sender: asyncio.Task[None] | None = None
        self._wanted: tuple[bool, bytes, float] = (False, b"", 0.0)
        self._advertising: tuple[bool, bytes, float] = (False, b"", 0.0)
        self._advertiser: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.detached = asyncio.Event()
        self.detached.set()
        self.notifications_sent = 0
        self.writes_received = 0

    # ------------------------------------------------------------------ lifecycle

    async def power_on(self, link: LocalLink) -> None:
        self.controller = virtual_controller(f"sim {self.device.serial_number}", link)
        self.bumble = Device(
            name=self.device.name,
            address=hci.Address(self.address),
            host=Host(self.controller, AsyncPipeSink(self.controller)),
        )
        services, self._characteristics = build_services(
            self.device, self._on_write, self.encrypted_uuids
        )
        self.bumble.add_services(services)
        self.bumble.on(self.bumble.EVENT_CONNECTION, self._on_connection)
        await self.bumble.power_on()
        self._sender = asyncio.get_running_loop().create_task(
            self._send_forever(), name=f"notify {self.device.serial_number}"
        )

    async def close(self) -> None:
        """Stop advertising and every task (the world is shutting down)."""
        for task in (self._sender, self._advertiser, *self._tasks):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._sender, self._advertiser, *self._tasks) if t is not None),
            return_exceptions=True,
        )
        self._detach(self._connection)
        if self.controller is not None:
            # Timers of the virtual controller would otherwise outlive the loop.
            self.controller.le_legacy_advertiser.stop()
            for advertising_set in self.controller.advertising_sets.values():
                advertising_set.stop()

    # ------------------------------------------------------------------ advertising

    def want_advertising(self, enabled: bool, interval_s: float) -> None:
        """Advertise (with the device's current data) or not; applied asynchronously."""
        data = advertising_data(self.device) if enabled else b""
        self._wanted = (enabled, data, interval_s)
        if self._wanted == self._advertising:
            return
        if self._advertiser is None or self._advertiser.done():
            self._advertiser = asyncio.get_running_loop().create_task(
                self._apply_advertising(), name=f"advertise {self.device.serial_number}"
            )

    async def wait_advertising_applied(self) -> None:
        """Return once the controller advertises (or not) as last asked."""
        if self._advertiser is not None:
            await self._advertiser

    async def _apply_advertising(self) -> None:
        assert self.bumble is not None
        while self._wanted != self._advertising:
            wanted = self._wanted
            enabled, data, interval_s = wanted
            if enabled:
                interval_ms = interval_s * MS_PER_S
                await self.bumble.start_advertising(
                    advertising_data=data,
                    scan_response_data=b"",
                    advertising_interval_min=interval_ms,
                    advertising_interval_max=interval_ms,
                )
            else:
                await self.bumble.stop_advertising()
            self._advertising = wanted

    # ------------------------------------------------------------------ connections

    @property
    def connection(self) -> Connection | None:
        return self._connection

    def _on_connection(self, connection: Connection) -> None:
        # The controller stops advertising when a central connects.
        self._advertising = (False, b"", 0.0)
        if self._connection is not None or not self.device.is_powered:
            self.close_connection(
                connection, hci.HCI_ErrorCode.CONNECTION_REJECTED_DUE_TO_LIMITED_RESOURCES_ERROR
            )
            return
        link = _GattLink(self, connection)
        self.device.attach_link(link)
        self._connection = connection
        self._link = link
        self.detached.clear()
        connection.on(connection.EVENT_DISCONNECTION, lambda _reason: self._detach(connection))

    def _detach(self, connection: Connection | None) -> None:
        if connection is None or connection is not self._connection:
            return
        self._connection = None
        if self.device.link is self._link:
            self.device.detach_link()
        self._link = None
        self.in_flight.reset(self.address)
        self.detached.set()

    def link_lost(self) -> None:
        """The radio link is gone (supervision timeout): the firmware notices now."""
        self._detach(self._connection)

    def close_connection(self, connection: Connection, reason: int) -> None:
        """Disconnect from the device side (an LL_TERMINATE_IND on the air)."""
        self._detach(connection)
        task = asyncio.get_running_loop().create_task(
            self._disconnect(connection, reason), name="peripheral disconnect"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _disconnect(connection: Connection, reason: int) -> None:
        try:
            await connection.disconnect(reason)
        except (hci.HCI_Error, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            _LOGGER.debug("peripheral disconnect: %s", exc)

    # ------------------------------------------------------------------ GATT traffic

    def notify(self, connection: Connection, channel: Channel, message: bytes) -> None:
        characteristic = self._characteristics.get(channel)
        if characteristic is None or connection is not self._connection:
            return
        if not self._is_subscribed(connection, characteristic):
            return  # the server would not send it: nothing will be in flight
        self.in_flight.queued(self.address)
        # One sender task keeps the notifications in the order the firmware sent them.
        self._outbox.put_nowait((connection, characteristic, message))

    def _is_subscribed(self, connection: Connection, characteristic: Characteristic[bytes]) -> bool:
        assert self.bumble is not None
        cccd = self.bumble.gatt_server.subscribers.get(connection, {}).get(characteristic.handle)
        return cccd is not None and len(cccd) > 0 and bool(cccd[0] & CCCD_NOTIFY)

    async def _send_forever(self) -> None:
        assert self.bumble is not None
        while True:
            connection, characteristic, message = await self._outbox.get()
            if connection is not self._connection:
                continue  # sent into a link that has gone since (reset its count)
            self.notifications_sent += 1
            await self.bumble.gatt_server.notify_subscriber(connection, characteristic, message)

    def _on_write(self, connection: Connection, channel: Channel, value: bytes) -> None:
        if connection is not self._connection:
            return
        self.writes_received += 1
        self.device.receive(channel, value)
