"""smpclient's transport protocol over devicebridge's own BLE link.

smpclient's ``SMPBLETransport`` scans and connects with its own ``BleakClient``
on the platform backend: it cannot borrow our connection (nor reach the
simulator's bleak backend). :class:`BleSmpTransport` implements smpclient's
``SMPTransport`` protocol over :class:`SmpBleLink`, our
:class:`~devicebridge.device.transport.ble.BleTransport` with the SMP characteristic
subscribed too, so one BLE connection carries the device's profile reads and SMP.
Serial and UDP use smpclient's own transports (a serial SMP console is a port
of its own, not our OFCP port).
"""

from __future__ import annotations

import asyncio
import logging

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError
from smpclient.transport import SMPTransport, SMPTransportDisconnected

from devicebridge.clock import Clock, wait_for
from devicebridge.device.transport.ble import BleTransport
from devicebridge.errors import DeviceBridgeError, TransportError
from devicebridge.firmware.channel import SMP_HEADER_BYTES, smp_message_bytes
from protocols.constants import ATT_DEFAULT_MTU, ATT_HEADER_BYTES, SMP_CHARACTERISTIC_UUID

_LOGGER = logging.getLogger(__name__)


class SmpBleLink(BleTransport):
    """Our BLE link, with the SMP characteristic's notifications going to its SMP transport."""

    _smp_receiver: BleSmpTransport | None = None  # set by the transport over this link

    async def connect(self) -> None:
        await super().connect()
        client = self._client
        assert client is not None
        if client.services.get_characteristic(SMP_CHARACTERISTIC_UUID) is None:
            await self.disconnect()
            raise TransportError(
                "no SMP service (MCUmgr) on this device: its firmware cannot be updated over BLE",
                device=self.description,
            )
        try:
            await client.start_notify(SMP_CHARACTERISTIC_UUID, self._on_smp_notification)
        except BleakError as exc:
            await self.disconnect()
            raise TransportError(
                f"enabling SMP notifications failed: {exc}", device=self.description
            ) from exc

    def _on_smp_notification(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        if self._smp_receiver is not None:
            self._smp_receiver.feed(bytes(data))

    async def write_smp(self, data: bytes) -> None:
        client = self._client
        if client is None or not client.is_connected:
            raise SMPTransportDisconnected(f"{self.description}: not connected")
        try:
            await client.write_gatt_char(SMP_CHARACTERISTIC_UUID, data, response=False)
        except BleakError as exc:
            raise SMPTransportDisconnected(f"{self.description}: write failed: {exc}") from exc

    @property
    def att_payload_bytes(self) -> int:
        """Bytes one write without response carries (ATT MTU - 3)."""
        client = self._client
        mtu = client.mtu_size if client is not None else ATT_DEFAULT_MTU
        return mtu - ATT_HEADER_BYTES


class BleSmpTransport(SMPTransport):
    """smpclient's transport protocol over :class:`SmpBleLink`; ``address`` is ignored."""

    def __init__(self, link: SmpBleLink, clock: Clock) -> None:
        self.link = link
        self._clock = clock
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._lost = asyncio.Event()
        self._smp_server_transport_buffer_size: int | None = None
        link._smp_receiver = self
        link.set_receivers(lambda _message: None, self._on_link_lost)

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._arrived.set()

    def _on_link_lost(self) -> None:
        self._lost.set()
        self._arrived.set()

    async def connect(self, address: str, timeout_s: float) -> None:
        del address  # the link knows its device (serial number or address)
        self._buffer.clear()
        self._lost.clear()
        try:
            await wait_for(self._clock, self.link.connect(), timeout_s)
        except TimeoutError:
            await self.link.disconnect()
            raise
        except DeviceBridgeError as exc:
            raise SMPTransportDisconnected(str(exc)) from exc

    async def disconnect(self) -> None:
        await self.link.disconnect()

    async def send(self, data: bytes) -> None:
        # Responses to earlier requests may still be on their way (pipelining): the
        # buffer is only cleared on connect, and the reader matches answers by sequence.
        if self._lost.is_set() or not self.link.is_connected:
            raise SMPTransportDisconnected(f"{self.link.description}: link lost")
        step = self.mtu
        for offset in range(0, len(data), step):
            await self.link.write_smp(data[offset : offset + step])

    async def receive(self) -> bytes:
        while True:
            if len(self._buffer) >= SMP_HEADER_BYTES:
                total = smp_message_bytes(self._buffer)
                if len(self._buffer) >= total:
                    message = bytes(self._buffer[:total])
                    del self._buffer[:total]
                    return message
            if self._lost.is_set():
                raise SMPTransportDisconnected(f"{self.link.description}: link lost")
            self._arrived.clear()
            await self._arrived.wait()

    async def send_and_receive(self, data: bytes) -> bytes:
        await self.send(data)
        return await self.receive()

    def initialize(self, smp_server_transport_buffer_size: int) -> None:
        self._smp_server_transport_buffer_size = smp_server_transport_buffer_size

    @property
    def mtu(self) -> int:
        return self.link.att_payload_bytes

    @property
    def max_unencoded_size(self) -> int:
        return self._smp_server_transport_buffer_size or self.mtu
