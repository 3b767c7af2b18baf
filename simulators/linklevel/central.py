"""The laptop side of link-level mode: bleak backends on a bumble central.

:class:`LinkLevelCentral` is the laptop's Bluetooth adapter: one bumble
``Device`` on one virtual controller, either on the world's in-memory link or,
over HCI on TCP, in front of a simulator that runs in another process. The
bleak backends bound to it (:func:`bind_scanner`, :func:`bind_client`) are
what the host passes as ``backend=``, exactly as with the in-process backend,
but every operation here is real ATT and GATT traffic:

* ``connect`` asks the controller to connect and returns when the peer's next
  advertisement arrived (one connect at a time: the controller allows only one
  pending LE connection, so connects queue), re-encrypts a bonded peer, then
  exchanges the MTU (247 unless ``request_mtu=`` says otherwise; ``None``
  keeps the default 23, so notifications longer than 20 bytes are cut) and
  discovers the services;
* writes with response longer than ``MTU - 3`` become long writes (Prepare
  Write / Execute Write); writes without response are refused locally above
  ``max_write_without_response_size``, as real stacks do;
* a characteristic that needs encryption answers INSUFFICIENT_ENCRYPTION until
  ``pair()`` (Just Works, bonding) has run;
* the disconnected callback runs on every disconnect, from either side (as
  with BlueZ, also on one the host asked for).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, TypeVar

from bleak.args import SizedBuffer
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bumble import att, core, hci
from bumble.controller import Controller
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, Transport

from protocols.constants import ATT_DEFAULT_MTU, ATT_HEADER_BYTES
from simulators.linklevel.gatt import bleak_uuid, parse_advertising_data, property_names
from simulators.linklevel.peripheral import virtual_controller
from simulators.links.bleak_backend import bound_backend

_LOGGER = logging.getLogger(__name__)

CENTRAL_ADDRESS: Final = "C0:DE:B1:D6:E0:01"
DEFAULT_REQUESTED_MTU: Final = 247  # docs/protocol.md 1.3
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_DISCONNECT_SETTLE_TIMEOUT_S: Final = 5.0  # a hang safety net, real seconds

T = TypeVar("T")


class _Default(enum.Enum):
    MTU = "the central's requested MTU"


class LinkLevelCentral:
    """The host's adapter: one bumble central shared by every scanner and client.

    ``resolve_address`` maps an address a caller knows (a simulated device's
    ``SI:MU:..`` address) to the one on the air; ``peer_detached`` lets an
    in-process world tell a disconnecting client when the device side has seen
    the link go (a central's disconnect completes after the peer acknowledged
    the LL_TERMINATE_IND).
    """

    def __init__(
        self,
        *,
        address: str = CENTRAL_ADDRESS,
        requested_mtu: int | None = DEFAULT_REQUESTED_MTU,
        resolve_address: Callable[[str], str] | None = None,
        peer_detached: Callable[[str], Awaitable[None]] | None = None,
        notification_received: Callable[[str], None] | None = None,
    ) -> None:
        self.address = address
        self.requested_mtu = requested_mtu
        self.resolve_address = resolve_address or (lambda address: address)
        self.peer_detached = peer_detached
        self.notification_received = notification_received
        self.controller: Controller | None = None
        self.bumble: Device | None = None
        self.connect_lock = asyncio.Lock()
        self._transport: Transport | None = None
        self._scanners: list[LinkLevelBleakScanner] = []
        self._clients: dict[str, LinkLevelBleakClient] = {}
        self._scan_lock = asyncio.Lock()
        self.callback_errors: list[Exception] = []

    # ------------------------------------------------------------------ lifecycle

    async def open_local(self, link: LocalLink) -> None:
        """Power on with a virtual controller of our own on ``link``."""
        self.controller = virtual_controller("devicebridge host", link)
        await self._open(Host(self.controller, AsyncPipeSink(self.controller)))

    async def open_transport(self, spec: str) -> None:
        """Power on against a controller reached through a bumble transport.

        ``spec`` is a bumble transport name, e.g. ``tcp-client:127.0.0.1:9100``
        for a simulator process serving HCI on TCP.
        """
        self._transport = await open_transport(spec)
        await self._open(Host(self._transport.source, self._transport.sink))

    async def _open(self, host: Host) -> None:
        self.bumble = Device(name="devicebridge", address=hci.Address(self.address), host=host)
        self.bumble.on(self.bumble.EVENT_ADVERTISEMENT, self._on_advertisement)
        await self.bumble.power_on()

    async def close(self) -> None:
        for client in list(self._clients.values()):
            client.close_quietly()
        self._scanners.clear()
        if self._transport is not None:
            transport, self._transport = self._transport, None
            await transport.close()

    @property
    def device(self) -> Device:
        if self.bumble is None:
            raise BleakError("the link-level central is not powered on (enter the world first)")
        return self.bumble

    # ------------------------------------------------------------------ scanning

    async def add_scanner(self, scanner: LinkLevelBleakScanner) -> None:
        async with self._scan_lock:
            if scanner in self._scanners:
                return
            if not self._scanners:
                await self.device.start_scanning(filter_duplicates=False)
            self._scanners.append(scanner)

    async def remove_scanner(self, scanner: LinkLevelBleakScanner) -> None:
        async with self._scan_lock:
            if scanner not in self._scanners:
                return
            self._scanners.remove(scanner)
            if not self._scanners and self.device.scanning:
                await self.device.stop_scanning()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        if not self._scanners:
            return
        name, service_uuids, manufacturer_data = parse_advertising_data(advertisement.data_bytes)
        tx_power = (
            None
            if advertisement.tx_power == Advertisement.TX_POWER_NOT_AVAILABLE
            else advertisement.tx_power
        )
        data = AdvertisementData(
            local_name=name,
            manufacturer_data=manufacturer_data,
            service_data={},
            service_uuids=service_uuids,
            tx_power=tx_power,
            rssi=advertisement.rssi,
            platform_data=(advertisement,),
        )
        address = advertisement.address.to_string(False)
        for scanner in list(self._scanners):
            scanner.receive_advertisement(address, data)

    # ------------------------------------------------------------------ clients

    def register(self, address: str, client: LinkLevelBleakClient) -> None:
        self._clients[address] = client

    def unregister(self, address: str, client: LinkLevelBleakClient) -> None:
        if self._clients.get(address) is client:
            del self._clients[address]

    def client_for(self, address: str) -> LinkLevelBleakClient | None:
        """The connected client of the peer at ``address`` (on-air address), if any."""
        return self._clients.get(address.upper())

    def record_callback_error(self, error: Exception) -> None:
        self.callback_errors.append(error)
        asyncio.get_running_loop().call_exception_handler(
            {"message": "host notification callback raised", "exception": error}
        )


class LinkLevelBleakScanner(BaseBleakScanner):
    """Scanner backend; use ``world.scanner_backend`` (a subclass bound to one central)."""

    central: ClassVar[LinkLevelCentral]

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self.scanning_mode = scanning_mode

    async def start(self) -> None:
        self.seen_devices = {}
        await self.central.add_scanner(self)

    async def stop(self) -> None:
        await self.central.remove_scanner(self)

    def receive_advertisement(self, address: str, adv: AdvertisementData) -> None:
        if not self.is_allowed_uuid(adv.service_uuids):
            return
        # Never a "path" key: that means BlueZ to bleak-retry-connector.
        details = {"link_level": True}
        device = self.create_or_update_device(address, address, adv.local_name, details, adv)
        self.call_detection_callbacks(device, adv)


class LinkLevelBleakClient(BaseBleakClient):
    """Client backend; use ``world.client_backend`` (a subclass bound to one central).

    Extra keyword: ``request_mtu`` (default: the central's, 247; ``None``: no
    MTU exchange at connect, see :meth:`exchange_mtu`).
    """

    central: ClassVar[LinkLevelCentral]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        request_mtu: int | _Default | None = _Default.MTU,
        **kwargs: Any,
    ) -> None:
        # Other keywords (services, bluez, pair, _is_retry_client, ...) come from
        # BleakClient and bleak-retry-connector and change nothing here.
        super().__init__(
            address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout
        )
        self._peer_address = self.central.resolve_address(self.address).upper()
        self._request_mtu = (
            self.central.requested_mtu if isinstance(request_mtu, _Default) else request_mtu
        )
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._subscriptions: dict[int, Callable[[bytes], None]] = {}
        self.notifications_received = 0

    # ------------------------------------------------------------------ connection

    @property
    def name(self) -> str:
        return self._peer_address

    @property
    def peer_address(self) -> str:
        """The address on the air (a simulated device's ``SI:MU`` address is mapped)."""
        return self._peer_address

    @property
    def mtu_size(self) -> int:
        connection = self._connection
        return int(connection.att_mtu) if connection is not None else ATT_DEFAULT_MTU

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    @property
    def is_encrypted(self) -> bool:
        return self._connection is not None and bool(self._connection.encryption)

    async def connect(self, pair: bool = False, **kwargs: Any) -> None:
        if self.is_connected:
            return
        timeout_s = float(kwargs.get("timeout", self._timeout))
        device = self.central.device
        async with self.central.connect_lock:
            try:
                connection = await device.connect(
                    hci.Address(self._peer_address), timeout=timeout_s
                )
            except core.TimeoutError:
                self._clear_pending_connect()
                raise BleakDeviceNotFoundError(
                    self.address,
                    f"Device with address {self.address} was not found "
                    f"(no advertisement within {timeout_s} s).",
                ) from None
            except (core.BaseBumbleError, hci.HCI_Error) as exc:
                raise BleakError(f"connect to {self.address} failed: {exc}") from exc
        self._connection = connection
        self._peer = Peer(connection)
        self._subscriptions.clear()
        connection.on(
            connection.EVENT_DISCONNECTION, lambda _reason: self._on_disconnection(connection)
        )
        self.central.register(self._peer_address, self)
        try:
            if await device.keystore.get(self._peer_address) is not None:  # type: ignore[union-attr]
                # A bonded peer: encrypt with the stored key, as BlueZ does.
                await self._guard(connection.encrypt())
            if pair:
                await self.pair()
            if self._request_mtu is not None:
                await self.exchange_mtu(self._request_mtu)
            await self._guard(self._discover(self._peer))
            self.services = self._build_services(self._peer)
        except BaseException:
            if self._connection is connection:
                self.close_quietly()
                await self._disconnect_quietly(connection)
            raise

    @staticmethod
    async def _discover(peer: Peer) -> None:
        await peer.discover_services()
        for service in peer.services:
            await peer.discover_characteristics(service=service)
            for characteristic in service.characteristics:
                await peer.discover_descriptors(characteristic=characteristic)

    def _clear_pending_connect(self) -> None:
        # bumble's virtual controller answers LE Create Connection Cancel without
        # forgetting the pending connection, which would refuse the next connect.
        if self.central.controller is not None:
            self.central.controller.pending_le_connection = None

    async def exchange_mtu(self, mtu: int) -> int:
        """ATT Exchange MTU (once per connection); returns the negotiated MTU."""
        peer = self._require_peer()
        return int(await self._guard(peer.request_mtu(mtu)))

    def _build_services(self, peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        for service in peer.services:
            bleak_service = BleakGATTService(service, service.handle, bleak_uuid(service.uuid))
            collection.add_service(bleak_service)
            for characteristic in service.characteristics:
                bleak_characteristic = BleakGATTCharacteristic(
                    characteristic,
                    characteristic.handle,
                    bleak_uuid(characteristic.uuid),
                    property_names(characteristic.properties),
                    lambda: self.mtu_size - ATT_HEADER_BYTES,
                    bleak_service,
                )
                collection.add_characteristic(bleak_characteristic)
                for descriptor in characteristic.descriptors:
                    collection.add_descriptor(
                        BleakGATTDescriptor(
                            descriptor,
                            descriptor.handle,
                            bleak_uuid(descriptor.type),
                            bleak_characteristic,
                        )
                    )
        return collection

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            return
        await self._disconnect_quietly(connection)
        # The event handler has run by now; this covers a disconnect that failed.
        self._on_disconnection(connection)
        if self.central.peer_detached is not None:
            # asyncio.timeout: Python 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(DEFAULT_DISCONNECT_SETTLE_TIMEOUT_S):
                await self.central.peer_detached(self._peer_address)

    @staticmethod
    async def _disconnect_quietly(connection: Connection) -> None:
        try:
            await connection.disconnect()
        except (core.BaseBumbleError, hci.HCI_Error) as exc:
            _LOGGER.debug("disconnect: %s", exc)

    def _on_disconnection(self, connection: Connection) -> None:
        if self._teardown(connection) and self._disconnected_callback is not None:
            self._disconnected_callback()

    def link_lost(self) -> None:
        """The link broke under the host (supervision timeout): called back now."""
        connection = self._connection
        if connection is not None:
            self._on_disconnection(connection)

    def close_quietly(self) -> None:
        """Forget the connection without calling back (the world is shutting down)."""
        if self._connection is not None:
            self._teardown(self._connection)

    def _teardown(self, connection: Connection) -> bool:
        if connection is not self._connection:
            return False
        self._connection = None
        self._peer = None
        self._subscriptions.clear()
        self.central.unregister(self._peer_address, self)
        return True

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Just Works pairing with bonding; the link is encrypted when it returns."""
        connection = self._require_connection()
        if connection.encryption:
            return
        await self._guard(connection.pair())

    async def unpair(self) -> None:
        """Forget the bond (the keys in the central's key store)."""
        keystore = self.central.device.keystore
        if keystore is not None and await keystore.get(self._peer_address) is not None:
            await keystore.delete(self._peer_address)

    # ------------------------------------------------------------------ GATT operations

    def _require_connection(self) -> Connection:
        if self._connection is None:
            raise BleakError("Not connected")
        return self._connection

    def _require_peer(self) -> Peer:
        self._require_connection()
        assert self._peer is not None
        return self._peer

    async def _guard(self, operation: Awaitable[T]) -> T:
        """Run a bumble operation, translating its errors to bleak's."""
        try:
            return await operation
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # bumble cancels a request's pending response when the link goes.
            raise BleakError("Not connected: the link went down during the request") from None
        except (core.BaseBumbleError, hci.HCI_Error) as exc:
            raise BleakError(f"{type(exc).__name__}: {exc}") from exc

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._require_peer()
        return bytearray(await self._guard(peer.read_value(characteristic.handle)))

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        peer = self._require_peer()
        payload = bytes(data)
        if not response and len(payload) > characteristic.max_write_without_response_size:
            raise BleakError(
                f"{len(payload)} bytes exceed max_write_without_response_size "
                f"{characteristic.max_write_without_response_size}"
            )
        await self._guard(peer.write_value(characteristic.handle, payload, with_response=response))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._require_peer()
        return bytearray(await self._guard(peer.read_value(descriptor.handle)))

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: SizedBuffer
    ) -> None:
        peer = self._require_peer()
        await self._guard(peer.write_value(descriptor.handle, bytes(data), with_response=True))

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        peer = self._require_peer()
        proxy = _proxy(characteristic)
        connection = self._connection

        def on_value(value: bytes) -> None:
            if self._connection is not connection:
                return
            self.notifications_received += 1
            if self.central.notification_received is not None:
                self.central.notification_received(self._peer_address)
            try:
                callback(bytearray(value))
            except Exception as exc:
                self.central.record_callback_error(exc)

        self._subscriptions[characteristic.handle] = on_value
        await self._guard(peer.subscribe(proxy, on_value))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        peer = self._require_peer()
        on_value = self._subscriptions.pop(characteristic.handle, None)
        await self._guard(peer.unsubscribe(_proxy(characteristic), on_value))


def _proxy(characteristic: BleakGATTCharacteristic) -> CharacteristicProxy[bytes]:
    proxy = characteristic.obj
    if not isinstance(proxy, CharacteristicProxy):
        raise BleakError(f"{characteristic} does not belong to a link-level connection")
    return proxy


def bind_scanner(central: LinkLevelCentral) -> type[LinkLevelBleakScanner]:
    """A scanner backend class bound to ``central``."""
    return bound_backend(LinkLevelBleakScanner, central=central)


def bind_client(central: LinkLevelCentral) -> type[LinkLevelBleakClient]:
    """A client backend class bound to ``central``."""
    return bound_backend(LinkLevelBleakClient, central=central)
