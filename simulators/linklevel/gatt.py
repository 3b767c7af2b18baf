"""The OFCP GATT database and advertising data as a bumble peripheral serves them.

The database is the one the in-process backend models
(:data:`simulators.links.bleak_backend.GATT_DATABASE`), so both modes expose the
same services, characteristics and values; here bumble's GATT server owns the
handles, the Client Characteristic Configuration descriptors, MTU cutting and
the permission checks. Identifiers cross the bumble/bleak boundary as plain
128-bit UUID strings: ``str()`` of a bumble UUID is ``'UUID-16:2A19'``, which
bleak does not accept.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Final

from bleak.assigned_numbers import CharacteristicPropertyName
from bumble import core
from bumble.att import Attribute, AttributeValue
from bumble.device import Connection
from bumble.gatt import Characteristic, Service

from protocols import CONTROL_CHAR_UUID, FACIAL_CARE_SERVICE_UUID, MANUFACTURER_ID
from simulators.devices.device import SimulatedDevice
from simulators.devices.link import Channel
from simulators.links.bleak_backend import GATT_DATABASE, CharacteristicSpec

# Commands move actuators, so only a paired (encrypted) link may write them;
# reading the profile and the device information stays open for identification.
ENCRYPTED_CHAR_UUIDS: Final = frozenset({CONTROL_CHAR_UUID})

_PROPERTY_FLAGS: Final[dict[str, Characteristic.Properties]] = {
    "broadcast": Characteristic.Properties.BROADCAST,
    "read": Characteristic.Properties.READ,
    "write-without-response": Characteristic.Properties.WRITE_WITHOUT_RESPONSE,
    "write": Characteristic.Properties.WRITE,
    "notify": Characteristic.Properties.NOTIFY,
    "indicate": Characteristic.Properties.INDICATE,
    "authenticated-signed-writes": Characteristic.Properties.AUTHENTICATED_SIGNED_WRITES,
    "extended-properties": Characteristic.Properties.EXTENDED_PROPERTIES,
}
_PROPERTY_NAMES: Final[tuple[tuple[Characteristic.Properties, CharacteristicPropertyName], ...]] = (
    (Characteristic.Properties.BROADCAST, "broadcast"),
    (Characteristic.Properties.READ, "read"),
    (Characteristic.Properties.WRITE_WITHOUT_RESPONSE, "write-without-response"),
    (Characteristic.Properties.WRITE, "write"),
    (Characteristic.Properties.NOTIFY, "notify"),
    (Characteristic.Properties.INDICATE, "indicate"),
    (Characteristic.Properties.AUTHENTICATED_SIGNED_WRITES, "authenticated-signed-writes"),
    (Characteristic.Properties.EXTENDED_PROPERTIES, "extended-properties"),
)

# Advertising data types (Bluetooth Core Specification Supplement, part A, 1).
AD_FLAGS: Final = 0x01
AD_COMPLETE_128_BIT_UUIDS: Final = 0x07
AD_SHORTENED_LOCAL_NAME: Final = 0x08
AD_COMPLETE_LOCAL_NAME: Final = 0x09
AD_MANUFACTURER_SPECIFIC: Final = 0xFF
# LE General Discoverable Mode, BR/EDR not supported.
AD_FLAGS_VALUE: Final = 0x06
COMPANY_ID_BYTES: Final = 2

WriteHandler = Callable[[Connection, Channel, bytes], None]


def bleak_uuid(value: core.UUID) -> str:
    """The 128-bit lowercase string bleak uses for a bumble UUID."""
    return str(uuid.UUID(bytes=value.to_bytes(force_128=True)[::-1]))


def property_names(properties: int) -> list[CharacteristicPropertyName]:
    """bleak's property names for bumble's property flags."""
    return [name for flag, name in _PROPERTY_NAMES if properties & flag]


def _properties(spec: CharacteristicSpec) -> Characteristic.Properties:
    flags = Characteristic.Properties(0)
    for name in spec.properties:
        flags |= _PROPERTY_FLAGS[name]
    return flags


def _permissions(spec: CharacteristicSpec, encrypted: bool) -> Attribute.Permissions:
    permissions = Attribute.Permissions(0)
    if "read" in spec.properties:
        permissions |= Attribute.Permissions.READABLE
        if encrypted:
            permissions |= Attribute.Permissions.READ_REQUIRES_ENCRYPTION
    if "write" in spec.properties or "write-without-response" in spec.properties:
        permissions |= Attribute.Permissions.WRITEABLE
        if encrypted:
            permissions |= Attribute.Permissions.WRITE_REQUIRES_ENCRYPTION
    return permissions


def build_services(
    device: SimulatedDevice,
    on_write: WriteHandler,
    encrypted_uuids: Iterable[str] = ENCRYPTED_CHAR_UUIDS,
) -> tuple[list[Service], dict[Channel, Characteristic[bytes]]]:
    """bumble services serving ``device``, and the characteristic of each notify channel."""
    encrypted = frozenset(encrypted_uuids)
    services: list[Service] = []
    by_channel: dict[Channel, Characteristic[bytes]] = {}
    for service_uuid, specs in GATT_DATABASE:
        characteristics: list[Characteristic[bytes]] = []
        for spec in specs:
            characteristic: Characteristic[bytes] = Characteristic(
                spec.uuid,
                _properties(spec),
                _permissions(spec, spec.uuid in encrypted),
                AttributeValue(read=_reader(device, spec), write=_writer(on_write, spec)),
            )
            characteristics.append(characteristic)
            if spec.channel is not None and spec.notifies:
                by_channel[spec.channel] = characteristic
        services.append(Service(service_uuid, characteristics))
    return services, by_channel


def _reader(
    device: SimulatedDevice, spec: CharacteristicSpec
) -> Callable[[Connection], bytes] | None:
    read = spec.read
    if read is None:
        return None
    return lambda _connection: read(device)


def _writer(
    on_write: WriteHandler, spec: CharacteristicSpec
) -> Callable[[Connection, bytes], None] | None:
    channel = spec.channel
    if channel is None:
        return None
    return lambda connection, value: on_write(connection, channel, bytes(value))


# ---------------------------------------------------------------------- advertising


def advertising_data(device: SimulatedDevice) -> bytes:
    """Flags, the Facial Care service, the name and the OFCP manufacturer data.

    The protocol puts the manufacturer data in the scan response; bumble's
    virtual link answers a scan with the advertising data again (it never sends
    the scan response data), so everything goes in the advertising data here.
    bumble does not enforce the 31-byte legacy limit either (see docs/qa.md).
    """
    service = uuid.UUID(FACIAL_CARE_SERVICE_UUID).bytes[::-1]
    manufacturer = MANUFACTURER_ID.to_bytes(COMPANY_ID_BYTES, "little")
    manufacturer += device.advertised_identity().encode()
    return b"".join(
        _ad_structure(kind, value)
        for kind, value in (
            (AD_FLAGS, bytes([AD_FLAGS_VALUE])),
            (AD_COMPLETE_128_BIT_UUIDS, service),
            (AD_COMPLETE_LOCAL_NAME, device.name.encode("utf-8")),
            (AD_MANUFACTURER_SPECIFIC, manufacturer),
        )
    )


def _ad_structure(kind: int, value: bytes) -> bytes:
    return bytes([len(value) + 1, kind]) + value


def parse_advertising_data(
    data: bytes,
) -> tuple[str | None, list[str], dict[int, bytes]]:
    """Local name, 128-bit service UUIDs and manufacturer data of raw advertising data.

    Malformed trailing bytes end the parse (a scanner keeps what it could read).
    """
    name: str | None = None
    services: list[str] = []
    manufacturer: dict[int, bytes] = {}
    offset = 0
    while offset + 1 < len(data):
        length = data[offset]
        if length == 0 or offset + 1 + length > len(data):
            break
        kind = data[offset + 1]
        value = data[offset + 2 : offset + 1 + length]
        offset += 1 + length
        if kind in (AD_COMPLETE_LOCAL_NAME, AD_SHORTENED_LOCAL_NAME):
            name = value.decode("utf-8", errors="replace")
        elif kind == AD_COMPLETE_128_BIT_UUIDS:
            services.extend(
                str(uuid.UUID(bytes=value[i : i + 16][::-1])) for i in range(0, len(value) - 15, 16)
            )
        elif kind == AD_MANUFACTURER_SPECIFIC and len(value) >= COMPANY_ID_BYTES:
            company = int.from_bytes(value[:COMPANY_ID_BYTES], "little")
            manufacturer[company] = value[COMPANY_ID_BYTES:]
    return name, services, manufacturer
