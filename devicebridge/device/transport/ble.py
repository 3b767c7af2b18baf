"""Bluetooth LE transport over bleak (the OFCP driver), and scanning for every family.

Scanning recognises the devices of every family of the device catalogue
(:mod:`devicebridge.core.catalogue`) and ignores other BLE devices. OFCP devices are
identified by the serial number they advertise in their manufacturer data, not by their
address: macOS shows UUIDs instead of MAC addresses and some devices rotate addresses.
Families that expose no serial number follow the catalogue's identity rule
(:func:`~devicebridge.core.catalogue.device_identity`). ``backends`` passes bleak's
``backend=`` through (``None`` is the platform backend); the simulator plugs in there.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError, BleakGATTProtocolError, BleakGATTProtocolErrorCode
from bleak_retry_connector import BleakNotFoundError, establish_connection

from devicebridge.clock import Clock, wait_for
from devicebridge.core.catalogue import (
    OFCP_DRIVER,
    OFCP_FAMILY,
    WIRE_KIND,
    CatalogueMatch,
    DeviceCatalogue,
    KindSupport,
    default_catalogue,
    device_identity,
)
from devicebridge.device.transport.base import (
    DeviceInfo,
    LinkLostReceiver,
    MalformedReceiver,
    MessageReceiver,
)
from devicebridge.errors import (
    BluetoothUnavailableError,
    ConnectionLostError,
    DeviceNotFoundError,
    NotConnectedError,
    TransportError,
)
from protocols import (
    BATTERY_LEVEL_CHAR_UUID,
    CONTROL_CHAR_UUID,
    DEVICE_PROFILE_CHAR_UUID,
    EVENTS_CHAR_UUID,
    FACIAL_CARE_SERVICE_UUID,
    FIRMWARE_REVISION_CHAR_UUID,
    HARDWARE_REVISION_CHAR_UUID,
    MANUFACTURER_ID,
    MANUFACTURER_NAME_CHAR_UUID,
    MODEL_NUMBER_CHAR_UUID,
    PROGRAM_CHAR_UUID,
    SERIAL_NUMBER_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    AdvertisedIdentity,
    DeviceKind,
    DeviceProfile,
    ProtocolError,
)
from protocols.constants import ATT_HEADER_BYTES

_LOGGER = logging.getLogger(__name__)

DEFAULT_FIND_TIMEOUT_S: Final = 10.0
# Connect attempts inside bleak-retry-connector; our session retries on top with
# its own backoff on the injected clock, so keep the library's own loop short.
CONNECT_ATTEMPTS: Final = 2
NOTIFY_CHAR_UUIDS: Final = (CONTROL_CHAR_UUID, TELEMETRY_CHAR_UUID, EVENTS_CHAR_UUID)
# A write with response carries at most one attribute value (docs/protocol.md 1.3).
MAX_ATTRIBUTE_WRITE_BYTES: Final = 512
# ATT errors that mean "pair first": the host pairs and retries the operation once.
PAIRING_REQUIRED_ERRORS: Final = frozenset(
    {
        BleakGATTProtocolErrorCode.INSUFFICIENT_AUTHENTICATION,
        BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION,
        BleakGATTProtocolErrorCode.INSUFFICIENT_ENCRYPTION_KEY_SIZE,
    }
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BleBackends:
    """bleak ``backend=`` classes for scanning and connecting (``None``: the platform's)."""

    scanner: type[BaseBleakScanner] | None = None
    client: type[BaseBleakClient] | None = None


@dataclass(frozen=True, slots=True)
class DiscoveredDevice:
    """One catalogued device seen advertising (``match``: its family and model)."""

    address: str
    name: str
    serial_number: str | None
    kind: DeviceKind | int | None
    battery_percent: int | None
    rssi: int
    busy: bool = False
    pairing_mode: bool = False
    ble_device: BLEDevice | None = field(default=None, compare=False, repr=False)
    match: CatalogueMatch | None = field(default=None, compare=False, repr=False)

    @property
    def kind_label(self) -> str:
        return kind_label(self.kind)

    @property
    def family(self) -> str:
        """The catalogue family's id (``ofcp`` unless the catalogue said otherwise)."""
        return self.match.family.id if self.match is not None else OFCP_FAMILY

    @property
    def model(self) -> str | None:
        """The catalogue's model name, when the advertised name says which."""
        return self.match.model.name if self.match and self.match.model else None

    @property
    def support(self) -> KindSupport | None:
        """What the catalogue says a device of this family and kind can do."""
        if self.match is None:
            return None
        kind = WIRE_KIND_NAMES.get(self.kind) if isinstance(self.kind, DeviceKind) else None
        return self.match.family.support(kind) or self.match.support

    @property
    def identity(self) -> str:
        """What a registry knows it by: its serial number, else the family's rule."""
        if self.match is None:
            return self.serial_number or self.address
        return device_identity(self.match.family, self.serial_number, self.address)


def kind_label(kind: DeviceKind | int | None) -> str:
    if isinstance(kind, DeviceKind):
        return {DeviceKind.MASSAGER: "massager", DeviceKind.LED_MASK: "led_mask"}[kind]
    return "unknown" if kind is None else f"kind-{kind}"


WIRE_KIND_NAMES: Final = {wire: name for name, wire in WIRE_KIND.items()}


def _discovered(
    device: BLEDevice, adv: AdvertisementData, catalogue: DeviceCatalogue
) -> DiscoveredDevice | None:
    """The device if the catalogue knows its family, else ``None`` (others are ignored)."""
    name = adv.local_name or device.name
    match = catalogue.match(name, adv.service_uuids, adv.manufacturer_data)
    if match is None:
        return None
    if match.family.driver != OFCP_DRIVER:
        kind = match.kind
        return DiscoveredDevice(
            address=device.address,
            name=name or device.address,
            serial_number=None,
            kind=WIRE_KIND[kind] if kind is not None else None,
            battery_percent=None,
            rssi=adv.rssi,
            ble_device=device,
            match=match,
        )
    raw = adv.manufacturer_data.get(MANUFACTURER_ID)
    identity: AdvertisedIdentity | None = None
    if raw is not None:
        try:
            identity = AdvertisedIdentity.decode(bytes(raw))
        except ProtocolError as exc:
            _LOGGER.debug("%s: unreadable manufacturer data: %s", device.address, exc)
    service_uuids = {uuid.lower() for uuid in adv.service_uuids}
    if identity is None and FACIAL_CARE_SERVICE_UUID not in service_uuids:
        return None
    return DiscoveredDevice(
        address=device.address,
        name=adv.local_name or device.name or device.address,
        serial_number=identity.serial_number if identity else None,
        kind=identity.device_kind if identity else None,
        battery_percent=identity.battery_percent if identity else None,
        rssi=adv.rssi,
        busy=identity.busy if identity else False,
        pairing_mode=identity.pairing_mode if identity else False,
        ble_device=device,
        match=match,
    )


async def _start_scanner(
    on_advertisement: Callable[[BLEDevice, AdvertisementData], None],
    backend: type[BaseBleakScanner] | None,
) -> BleakScanner:
    """A started scanner; no Bluetooth stack or adapter is one clear error, not a D-Bus trace."""
    try:
        scanner = BleakScanner(detection_callback=on_advertisement, backend=backend)
        await scanner.start()
    except (BleakError, OSError) as exc:
        raise bluetooth_unavailable(exc) from exc
    return scanner


def bluetooth_unavailable(exc: BaseException) -> BluetoothUnavailableError:
    """What a failure to start scanning means for the user."""
    text = str(exc)
    # No D-Bus socket (OSError), no BlueZ on the bus, or BlueZ without an adapter.
    if isinstance(exc, OSError) or "ServiceUnknown" in text or "No Bluetooth adapters" in text:
        stack = "BlueZ not running?" if sys.platform.startswith("linux") else "is Bluetooth on?"
        return BluetoothUnavailableError(f"no Bluetooth adapter found ({stack})")
    return BluetoothUnavailableError(f"Bluetooth is not available ({text or type(exc).__name__})")


async def scan(
    clock: Clock,
    duration_s: float,
    backend: type[BaseBleakScanner] | None = None,
    catalogue: DeviceCatalogue | None = None,
) -> list[DiscoveredDevice]:
    """Listen for ``duration_s`` (on ``clock``) and return every catalogued device seen."""
    known = catalogue or default_catalogue()
    seen: dict[str, DiscoveredDevice] = {}

    def on_advertisement(device: BLEDevice, adv: AdvertisementData) -> None:
        found = _discovered(device, adv, known)
        if found is not None:
            seen[found.serial_number or found.address] = found

    scanner = await _start_scanner(on_advertisement, backend)
    try:
        try:
            await clock.sleep(duration_s)
        finally:
            await scanner.stop()
    except BleakError as exc:
        raise TransportError(f"scan failed: {exc}", device="BLE adapter") from exc
    return sorted(seen.values(), key=lambda d: (d.name, d.address))


def matches(device: DiscoveredDevice, identifier: str) -> bool:
    """Does ``identifier`` (serial number or identity, address or advertised name) name
    ``device``?"""
    wanted = identifier.casefold()
    return wanted in {
        (device.serial_number or "").casefold(),
        device.identity.casefold(),
        device.address.casefold(),
        device.name.casefold(),
    }


async def find_device(
    clock: Clock,
    predicate: Callable[[DiscoveredDevice], bool],
    timeout_s: float,
    backend: type[BaseBleakScanner] | None = None,
    *,
    description: str = "device",
    catalogue: DeviceCatalogue | None = None,
) -> DiscoveredDevice:
    """Scan until an advertisement satisfies ``predicate``; stop as soon as one does."""
    known = catalogue or default_catalogue()
    found: asyncio.Future[DiscoveredDevice] = asyncio.get_running_loop().create_future()

    def on_advertisement(device: BLEDevice, adv: AdvertisementData) -> None:
        if found.done():
            return
        candidate = _discovered(device, adv, known)
        if candidate is not None and predicate(candidate):
            found.set_result(candidate)

    scanner = await _start_scanner(on_advertisement, backend)
    try:
        try:
            return await wait_for(clock, asyncio.shield(found), timeout_s)
        except TimeoutError:
            raise DeviceNotFoundError(description, timeout_s=timeout_s, where="BLE") from None
        finally:
            await scanner.stop()
    except BleakError as exc:
        raise TransportError(f"scan failed: {exc}", device="BLE adapter") from exc


class GattTransport:
    """What every GATT driver shares: finding the device, connecting through
    bleak-retry-connector, the link-loss callback, disconnecting, pairing on demand.

    A driver (:class:`BleTransport` for OFCP, ``transport.foreo.ForeoTransport``)
    says which advertisement is its device (:meth:`_is_target`), what it does once
    connected (:meth:`connect`) and how it talks.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        address: str | None,
        device: DiscoveredDevice | None,
        backends: BleBackends | None,
        find_timeout_s: float,
    ) -> None:
        self._clock = clock
        self._address = address or (device.address if device else None)
        self._ble_device = device.ble_device if device else None
        self._backends = backends or BleBackends()
        self._find_timeout_s = find_timeout_s
        self._client: BleakClient | None = None
        self._on_message: MessageReceiver | None = None
        self._on_link_lost: LinkLostReceiver | None = None
        self._closing = False
        self._mtu_size = 23

    # ------------------------------------------------------------------ properties

    @property
    def description(self) -> str:
        return f"BLE {self._address or '?'}"

    @property
    def address(self) -> str | None:
        """The last address the device was seen at."""
        return self._address

    @property
    def is_connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    @property
    def mtu_size(self) -> int:
        """The ATT MTU negotiated on the current link (23 until an exchange)."""
        client = self._client
        if client is not None and client.is_connected:
            # Some stacks exchange the MTU after connect returns: ask every time.
            self._mtu_size = client.mtu_size
        return self._mtu_size

    @property
    def max_message_bytes(self) -> int:
        return self.mtu_size - ATT_HEADER_BYTES

    def set_receivers(
        self,
        on_message: MessageReceiver,
        on_link_lost: LinkLostReceiver,
        on_malformed: MalformedReceiver | None = None,
    ) -> None:
        # GATT delivers whole messages, so there are no framing errors to report.
        del on_malformed
        self._on_message = on_message
        self._on_link_lost = on_link_lost

    # ------------------------------------------------------------------ link

    def _is_target(self, device: DiscoveredDevice) -> bool:
        """Whether an advertisement is this transport's device."""
        return self._address is not None and device.address.casefold() == self._address.casefold()

    def _seen(self, device: DiscoveredDevice) -> None:
        """The advertisement the next connect uses (a driver may read more of it)."""
        self._ble_device = device.ble_device
        self._address = device.address

    async def wait_for_device(self, timeout_s: float) -> None:
        found = await find_device(
            self._clock,
            self._is_target,
            timeout_s,
            self._backends.scanner,
            description=self.description,
        )
        self._seen(found)

    async def _open_client(self) -> BleakClient:
        """Connect (scanning first if no fresh advertisement is at hand)."""
        if self._ble_device is None:
            await self.wait_for_device(self._find_timeout_s)
        assert self._ble_device is not None
        device, self._ble_device = self._ble_device, None  # an advertisement is used once
        self._closing = False
        try:
            client = await establish_connection(
                BleakClient,
                device,
                self.description,
                disconnected_callback=self._on_disconnected,
                max_attempts=CONNECT_ATTEMPTS,
                backend=self._backends.client,
            )
        except BleakNotFoundError as exc:
            raise DeviceNotFoundError(self.description, where=f"connect: {exc}") from exc
        except (BleakError, TimeoutError) as exc:
            raise TransportError(f"connect failed: {exc}", device=self.description) from exc
        self._client = client
        self._mtu_size = client.mtu_size
        return client

    async def disconnect(self) -> None:
        self._closing = True
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.disconnect()
        except BleakError as exc:
            # The link is going away either way; a failed goodbye is not worth raising.
            _LOGGER.debug("%s: disconnect: %s", self.description, exc)

    def _on_disconnected(self, client: BleakClient) -> None:
        if client is not self._client or self._closing:
            return  # a stale client, or a disconnect we asked for
        self._client = None
        _LOGGER.info("%s: link lost", self.description)
        if self._on_link_lost is not None:
            self._on_link_lost()

    def _connected_client(self) -> BleakClient:
        if self._client is None or not self._client.is_connected:
            raise NotConnectedError("not connected", device=self.description)
        return self._client

    async def _paired_if_needed(
        self, client: BleakClient, operation: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``operation``; if the device wants an encrypted link, pair and retry once."""
        try:
            return await operation()
        except BleakGATTProtocolError as exc:
            if exc.code not in PAIRING_REQUIRED_ERRORS:
                raise
            _LOGGER.info("%s: %s; pairing", self.description, exc.code.name)
        try:
            await client.pair()
        except BleakError as exc:
            raise TransportError(f"pairing failed: {exc}", device=self.description) from exc
        return await operation()

    def _check_write_size(self, data: bytes, what: str) -> None:
        # With response, the stack splits a long value into prepared writes up to
        # one attribute value; beyond that no stack can carry it.
        if len(data) > MAX_ATTRIBUTE_WRITE_BYTES:
            raise TransportError(
                f"{what} of {len(data)} bytes exceeds the {MAX_ATTRIBUTE_WRITE_BYTES}-byte "
                "attribute limit",
                device=self.description,
            )

    async def _read(self, client: BleakClient, uuid: str) -> bytes:
        try:
            return bytes(await self._paired_if_needed(client, lambda: client.read_gatt_char(uuid)))
        except BleakError as exc:
            raise TransportError(f"reading {uuid} failed: {exc}", device=self.description) from exc


class BleTransport(GattTransport):
    """One OFCP device over GATT: the OFCP driver (satisfies
    :class:`devicebridge.device.transport.base.Transport`).

    ``serial_number`` identifies the device in advertisements; ``address`` is a
    fallback for devices that do not advertise one. ``device`` (a fresh scan
    result) saves the first scan.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        serial_number: str | None = None,
        address: str | None = None,
        device: DiscoveredDevice | None = None,
        backends: BleBackends | None = None,
        find_timeout_s: float = DEFAULT_FIND_TIMEOUT_S,
    ) -> None:
        if serial_number is None and address is None and device is None:
            raise ValueError("BleTransport needs a serial number, an address or a scanned device")
        super().__init__(
            clock,
            address=address,
            device=device,
            backends=backends,
            find_timeout_s=find_timeout_s,
        )
        self._serial_number = serial_number or (device.serial_number if device else None)

    @property
    def description(self) -> str:
        who = self._serial_number or self._address or "?"
        return f"BLE {who}" if self._address in (None, who) else f"BLE {who} ({self._address})"

    @property
    def max_program_chunk_bytes(self) -> int:
        return min(MAX_ATTRIBUTE_WRITE_BYTES, self.mtu_size - ATT_HEADER_BYTES)

    def _is_target(self, device: DiscoveredDevice) -> bool:
        if device.match is not None and device.match.family.driver != OFCP_DRIVER:
            return False  # another family's device, whatever its address
        if self._serial_number is not None and device.serial_number is not None:
            return device.serial_number == self._serial_number
        return super()._is_target(device)

    async def wait_for_device(self, timeout_s: float) -> None:
        found = await find_device(
            self._clock,
            self._is_target,
            timeout_s,
            self._backends.scanner,
            description=self._serial_number or self._address or "device",
        )
        self._seen(found)

    async def connect(self) -> None:
        client = await self._open_client()
        try:
            # Notifications do not survive a reconnect: enable them on every connect.
            for uuid in NOTIFY_CHAR_UUIDS:
                await client.start_notify(uuid, self._on_notification)
        except BleakError as exc:
            await self.disconnect()
            raise TransportError(
                f"enabling notifications failed: {exc}", device=self.description
            ) from exc

    def _on_notification(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        # A plain callback: bleak runs an async one as one task per notification,
        # which does not keep their order.
        if self._on_message is not None:
            self._on_message(bytes(data))

    # ------------------------------------------------------------------ I/O

    async def write_control(self, data: bytes) -> None:
        client = self._connected_client()
        self._check_write_size(data, "command")
        try:
            await self._paired_if_needed(
                client, lambda: client.write_gatt_char(CONTROL_CHAR_UUID, data, response=True)
            )
        except BleakError as exc:
            raise ConnectionLostError(f"write failed: {exc}", device=self.description) from exc

    async def write_program_chunk(self, data: bytes) -> None:
        client = self._connected_client()
        self._check_write_size(data, "program chunk")
        try:
            await self._paired_if_needed(
                client, lambda: client.write_gatt_char(PROGRAM_CHAR_UUID, data, response=True)
            )
        except BleakError as exc:
            raise ConnectionLostError(
                f"program chunk write failed: {exc}", device=self.description
            ) from exc

    async def _read_text(self, client: BleakClient, uuid: str) -> str:
        return (await self._read(client, uuid)).decode("utf-8", errors="replace")

    async def read_device_info(self) -> DeviceInfo:
        client = self._connected_client()
        raw_profile = await self._read(client, DEVICE_PROFILE_CHAR_UUID)
        try:
            profile = DeviceProfile.decode(raw_profile)
        except ProtocolError as exc:
            raise TransportError(
                f"unreadable device profile: {exc}", device=self.description
            ) from exc
        battery = await self._read(client, BATTERY_LEVEL_CHAR_UUID)
        info = DeviceInfo(
            serial_number=await self._read_text(client, SERIAL_NUMBER_CHAR_UUID),
            model_number=await self._read_text(client, MODEL_NUMBER_CHAR_UUID),
            firmware_revision=await self._read_text(client, FIRMWARE_REVISION_CHAR_UUID),
            hardware_revision=await self._read_text(client, HARDWARE_REVISION_CHAR_UUID),
            manufacturer_name=await self._read_text(client, MANUFACTURER_NAME_CHAR_UUID),
            battery_percent=battery[0] if battery else None,
            profile=profile,
        )
        self._serial_number = self._serial_number or info.serial_number
        return info
