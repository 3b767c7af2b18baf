"""bleak backends bound to a :class:`~simulators.world.SimulatedWorld`.

The host keeps using the real ``BleakScanner`` and ``BleakClient``; only the
``backend=`` argument changes, so everything above bleak (and bleak's own
front-end code) runs as it would against hardware. Behaviour follows BlueZ,
the stack of the development machines:

* the disconnected callback is called on every disconnect, also on one the
  host asked for (BlueZ reports it through the same ``Connected`` property);
* notifications are delivered synchronously, in order, while the device sends
  them, so an ack can arrive *before* ``write_gatt_char`` returns (as with
  BlueZ, where the notification signal can be handled before the write reply);
  a host must be ready for the ack before it writes;
* a notification longer than ``mtu_size - 3`` is cut to that length;
* subscriptions do not survive a disconnect: call ``start_notify`` again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar, cast

from bleak.args import SizedBuffer
from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import (
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)

from protocols import (
    BATTERY_LEVEL_CHAR_UUID,
    BATTERY_SERVICE_UUID,
    CONTROL_CHAR_UUID,
    DEVICE_INFORMATION_SERVICE_UUID,
    DEVICE_PROFILE_CHAR_UUID,
    EVENTS_CHAR_UUID,
    FACIAL_CARE_SERVICE_UUID,
    FIRMWARE_REVISION_CHAR_UUID,
    HARDWARE_REVISION_CHAR_UUID,
    MANUFACTURER_NAME_CHAR_UUID,
    MODEL_NUMBER_CHAR_UUID,
    PROGRAM_CHAR_UUID,
    SERIAL_NUMBER_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
)
from protocols.constants import (
    ATT_HEADER_BYTES,
    ATT_MAX_ATTRIBUTE_BYTES,
    CLIENT_CHARACTERISTIC_CONFIG_UUID,
    SMP_CHARACTERISTIC_UUID,
    SMP_SERVICE_UUID,
)
from protocols.foreo import FOREO_CONTROL_CHAR_UUID, FOREO_SERVICE_UUID
from simulators.devices.device import SimulatedDevice
from simulators.devices.foreo import SimulatedForeo
from simulators.devices.link import Channel

if TYPE_CHECKING:
    from simulators.world import SimulatedWorld

# Every device the backend reaches: OFCP firmware, or a device of another family.
Peripheral = SimulatedDevice | SimulatedForeo

CCCD_NOTIFY: Final = 0x0001
CCCD_INDICATE: Final = 0x0002
CCCD_BYTES: Final = 2


@dataclass(frozen=True, slots=True)
class CharacteristicSpec:
    """One characteristic of the simulated GATT database (the ``obj`` bleak carries)."""

    uuid: str
    properties: tuple[CharacteristicPropertyName, ...]
    channel: Channel | None = None  # notifications / writes route here
    read: Callable[[Peripheral], bytes] | None = None

    @property
    def notifies(self) -> bool:
        return "notify" in self.properties or "indicate" in self.properties


def _ofcp(read: Callable[[SimulatedDevice], bytes]) -> Callable[[Peripheral], bytes]:
    """A read only OFCP firmware answers (its database is only offered by OFCP devices)."""

    def on(device: Peripheral) -> bytes:
        if not isinstance(device, SimulatedDevice):
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.READ_NOT_PERMITTED)
        return read(device)

    return on


def _utf8(field: str) -> Callable[[Peripheral], bytes]:
    return _ofcp(lambda device: device.device_information[field].encode("utf-8"))


def _battery(device: Peripheral) -> bytes:
    return bytes([device.battery_percent])


GATT_DATABASE: Final[tuple[tuple[str, tuple[CharacteristicSpec, ...]], ...]] = (
    (
        FACIAL_CARE_SERVICE_UUID,
        (
            CharacteristicSpec(
                DEVICE_PROFILE_CHAR_UUID, ("read",), read=_ofcp(lambda d: d.profile.encode())
            ),
            CharacteristicSpec(CONTROL_CHAR_UUID, ("write", "notify"), Channel.CONTROL),
            CharacteristicSpec(TELEMETRY_CHAR_UUID, ("notify",), Channel.TELEMETRY),
            CharacteristicSpec(EVENTS_CHAR_UUID, ("notify",), Channel.EVENTS),
            CharacteristicSpec(PROGRAM_CHAR_UUID, ("write", "notify"), Channel.PROGRAM),
        ),
    ),
    (
        BATTERY_SERVICE_UUID,
        (
            CharacteristicSpec(
                BATTERY_LEVEL_CHAR_UUID,
                ("read", "notify"),
                Channel.BATTERY,
                read=_battery,
            ),
        ),
    ),
    (
        DEVICE_INFORMATION_SERVICE_UUID,
        (
            CharacteristicSpec(
                MANUFACTURER_NAME_CHAR_UUID, ("read",), read=_utf8("manufacturer_name")
            ),
            CharacteristicSpec(MODEL_NUMBER_CHAR_UUID, ("read",), read=_utf8("model_number")),
            CharacteristicSpec(SERIAL_NUMBER_CHAR_UUID, ("read",), read=_utf8("serial_number")),
            CharacteristicSpec(
                HARDWARE_REVISION_CHAR_UUID, ("read",), read=_utf8("hardware_revision")
            ),
            CharacteristicSpec(
                FIRMWARE_REVISION_CHAR_UUID, ("read",), read=_utf8("firmware_revision")
            ),
        ),
    ),
    # MCUmgr: the world routes this characteristic to the device's SMP server.
    (
        SMP_SERVICE_UUID,
        (
            CharacteristicSpec(
                SMP_CHARACTERISTIC_UUID, ("write-without-response", "notify"), Channel.SMP
            ),
        ),
    ),
)


# A FOREO device as the public description has it (simulators/devices/foreo.py): the control
# characteristic takes writes with response only, and the standard Battery Service.
FOREO_GATT_DATABASE: Final[tuple[tuple[str, tuple[CharacteristicSpec, ...]], ...]] = (
    (
        FOREO_SERVICE_UUID,
        (CharacteristicSpec(FOREO_CONTROL_CHAR_UUID, ("write",), Channel.CONTROL),),
    ),
    (
        BATTERY_SERVICE_UUID,
        (
            CharacteristicSpec(
                BATTERY_LEVEL_CHAR_UUID, ("read", "notify"), Channel.BATTERY, read=_battery
            ),
        ),
    ),
)


def gatt_database(
    device: Peripheral,
) -> tuple[tuple[str, tuple[CharacteristicSpec, ...]], ...]:
    """The services ``device`` offers."""
    return FOREO_GATT_DATABASE if isinstance(device, SimulatedForeo) else GATT_DATABASE


def build_services(
    mtu_size: Callable[[], int],
    database: tuple[tuple[str, tuple[CharacteristicSpec, ...]], ...] = GATT_DATABASE,
) -> BleakGATTServiceCollection:
    """A fresh service collection (handles are stable: same database every time)."""
    collection = BleakGATTServiceCollection()
    handle = 0
    for service_uuid, characteristics in database:
        handle += 1
        service = BleakGATTService(None, handle, service_uuid)
        collection.add_service(service)
        for spec in characteristics:
            handle += 1
            characteristic = BleakGATTCharacteristic(
                spec,
                handle,
                spec.uuid,
                list(spec.properties),
                lambda: mtu_size() - ATT_HEADER_BYTES,
                service,
            )
            collection.add_characteristic(characteristic)
            if spec.notifies:
                handle += 1
                collection.add_descriptor(
                    BleakGATTDescriptor(
                        None, handle, CLIENT_CHARACTERISTIC_CONFIG_UUID, characteristic
                    )
                )
    return collection


class SimulatedBleakScanner(BaseBleakScanner):
    """Scanner backend; use ``world.scanner_backend`` (a subclass bound to one world)."""

    world: ClassVar[SimulatedWorld]

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
        self.world.add_scanner(self)

    async def stop(self) -> None:
        self.world.remove_scanner(self)

    def receive_advertisement(self, device: Peripheral, adv: AdvertisementData) -> None:
        """One advertisement heard by this scanner (called by the world)."""
        if not self.is_allowed_uuid(adv.service_uuids):
            return
        # A dict like BlueZ's, but never with a "path" key: that means BlueZ to
        # bleak-retry-connector, which would then call D-Bus.
        details: dict[str, object] = {"simulated": True}
        if isinstance(device, SimulatedDevice):  # others expose no serial number on air
            details["serial_number"] = device.serial_number
        ble_device = self.create_or_update_device(
            device.address, device.address, device.name, details, adv
        )
        self.call_detection_callbacks(ble_device, adv)


class _BleLink:
    """The device's view of one BLE connection."""

    def __init__(self, client: SimulatedBleakClient, device: Peripheral) -> None:
        self.client = client
        self.device = device

    @property
    def max_payload_bytes(self) -> int:
        return self.device.mtu_size - ATT_HEADER_BYTES

    def send(self, channel: Channel, message: bytes) -> None:
        self.client.deliver(channel, message)

    def device_closed(self) -> None:
        self.client.link_lost()


class SimulatedBleakClient(BaseBleakClient):
    """Client backend; use ``world.client_backend`` (a subclass bound to one world)."""

    world: ClassVar[SimulatedWorld]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        # Extra keywords (services, bluez, winrt, pair, _is_retry_client, ...) come
        # from BleakClient and bleak-retry-connector; none changes a simulated link.
        super().__init__(
            address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout
        )
        self._device: Peripheral | None = None
        self._link: _BleLink | None = None
        self._callbacks: dict[int, NotifyCallback] = {}
        self._cccd: dict[int, int] = {}
        self._channel_handles: dict[Channel, int] = {}
        self.notifications_dropped = 0
        self.notifications_truncated = 0

    # ------------------------------------------------------------------ connection

    @property
    def name(self) -> str:
        device = self.world.peripheral_by_address(self.address)
        return device.name if device is not None else self.address.replace(":", "-")

    @property
    def mtu_size(self) -> int:
        device = self._device or self.world.peripheral_by_address(self.address)
        if device is None:
            raise BleakError("Not connected")
        return device.mtu_size

    @property
    def is_connected(self) -> bool:
        return self._link is not None

    async def connect(self, pair: bool = False, **kwargs: Any) -> None:
        if self.is_connected:
            return
        await self.world.connect_delay()
        device = self.world.peripheral_by_address(self.address)
        if device is None or not self.world.is_connectable(device):
            raise BleakDeviceNotFoundError(
                self.address, f"Device with address {self.address} was not found."
            )
        if device.is_connected:
            raise BleakError(f"{self.address} is already connected to another client")
        link = _BleLink(self, device)
        device.attach_link(link)
        self._device = device
        self._link = link
        self._callbacks.clear()
        self._cccd.clear()
        self.services = build_services(
            lambda: link.max_payload_bytes + ATT_HEADER_BYTES, gatt_database(device)
        )
        self._channel_handles = {
            char.obj.channel: char.handle
            for char in self.services.characteristics.values()
            if isinstance(char.obj, CharacteristicSpec) and char.obj.channel is not None
        }
        self.world.register_connection(device, self)

    async def disconnect(self) -> None:
        if self._teardown():
            self._notify_disconnected()

    def link_lost(self) -> None:
        """The link broke under the host (range, power): like a supervision timeout."""
        if self._teardown():
            self._notify_disconnected()

    def close_quietly(self) -> None:
        """Tear down without calling back (the world is shutting down)."""
        self._teardown()

    def _teardown(self) -> bool:
        link, self._link = self._link, None
        if link is None:
            return False
        device = link.device
        if device.is_connected and self._device is device:
            device.detach_link()
        self.world.unregister_connection(device, self)
        self._callbacks.clear()
        self._cccd.clear()
        return True

    def _notify_disconnected(self) -> None:
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Just Works pairing always succeeds; nothing here needs encryption."""

    async def unpair(self) -> None:
        """Nothing is stored to forget."""

    # ------------------------------------------------------------------ notifications

    def deliver(self, channel: Channel, message: bytes) -> None:
        """A notification from the device (called synchronously by the device model)."""
        link = self._link
        handle = self._channel_handles.get(channel)
        if link is None or handle is None:
            return
        callback = self._callbacks.get(handle)
        if callback is None or not self._cccd.get(handle):
            self.notifications_dropped += 1
            return
        limit = link.max_payload_bytes
        if len(message) > limit:
            self.notifications_truncated += 1
            message = message[:limit]
        try:
            callback(bytearray(message))
        except Exception as exc:
            # A host bug must not kill the simulated firmware mid-tick; the world
            # reports it when it stops (and the loop's handler logs it now).
            self.world.record_callback_error(exc)

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        self._require_connected()
        if not _spec(characteristic).notifies:
            raise BleakError(f"Characteristic {characteristic.uuid} does not notify or indicate")
        self._callbacks[characteristic.handle] = callback
        self._cccd[characteristic.handle] = CCCD_NOTIFY

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._require_connected()
        self._callbacks.pop(characteristic.handle, None)
        self._cccd.pop(characteristic.handle, None)

    # ------------------------------------------------------------------ reads and writes

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        device = self._require_connected()
        spec = _spec(characteristic)
        if spec.read is None:
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.READ_NOT_PERMITTED)
        return bytearray(spec.read(device))

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool
    ) -> None:
        device = self._require_connected()
        spec = _spec(characteristic)
        payload = bytes(data)
        property_name: CharacteristicPropertyName = (
            "write" if response else "write-without-response"
        )
        if spec.channel is None or property_name not in spec.properties:
            if response:
                raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.WRITE_NOT_PERMITTED)
            # A write command has no reply on air; a real stack refuses it locally.
            raise BleakError(f"Characteristic {characteristic.uuid} has no {property_name}")
        if response and len(payload) > ATT_MAX_ATTRIBUTE_BYTES:
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.INVALID_ATTRIBUTE_VALUE_LENGTH)
        if not response and len(payload) > characteristic.max_write_without_response_size:
            raise BleakError(
                f"{len(payload)} bytes exceed max_write_without_response_size "
                f"{characteristic.max_write_without_response_size}"
            )
        if spec.channel is Channel.SMP and isinstance(device, SimulatedDevice):
            self.world.smp_firmware(device).receive_ble(self, payload)
            return
        device.receive(spec.channel, payload)

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        self._require_connected()
        if descriptor.uuid != CLIENT_CHARACTERISTIC_CONFIG_UUID:
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.READ_NOT_PERMITTED)
        value = self._cccd.get(descriptor.characteristic_handle, 0)
        return bytearray(value.to_bytes(CCCD_BYTES, "little"))

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: SizedBuffer
    ) -> None:
        self._require_connected()
        if descriptor.uuid != CLIENT_CHARACTERISTIC_CONFIG_UUID:
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.WRITE_NOT_PERMITTED)
        payload = bytes(data)
        if len(payload) != CCCD_BYTES:
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.INVALID_ATTRIBUTE_VALUE_LENGTH)
        value = int.from_bytes(payload, "little")
        if value & (CCCD_NOTIFY | CCCD_INDICATE):
            self._cccd[descriptor.characteristic_handle] = value
        else:
            self._cccd.pop(descriptor.characteristic_handle, None)

    def _require_connected(self) -> Peripheral:
        if self._link is None:
            raise BleakError("Not connected")
        return self._link.device


def _spec(characteristic: BleakGATTCharacteristic) -> CharacteristicSpec:
    spec = characteristic.obj
    if not isinstance(spec, CharacteristicSpec):
        raise BleakError(f"{characteristic} does not belong to a simulated device")
    return spec


B = TypeVar("B", bound=type)


def bound_backend(backend: B, **attributes: object) -> B:
    """A subclass of ``backend`` carrying ``attributes`` (bleak instantiates backends by
    class, so a class per world is how a backend finds its world)."""
    bound = type(backend.__name__, (backend,), dict(attributes))
    bound.__qualname__ = backend.__qualname__
    return cast(B, bound)


def bind_scanner(world: SimulatedWorld) -> type[SimulatedBleakScanner]:
    """A scanner backend class bound to ``world``."""
    return bound_backend(SimulatedBleakScanner, world=world)


def bind_client(world: SimulatedWorld) -> type[SimulatedBleakClient]:
    """A client backend class bound to ``world``."""
    return bound_backend(SimulatedBleakClient, world=world)
