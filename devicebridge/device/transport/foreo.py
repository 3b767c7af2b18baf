"""The FOREO driver: the bridge's device commands carried to a FOREO device's one write.

Every driver is a :class:`~devicebridge.device.transport.base.Transport`: the session above
it numbers the bridge's commands (the OFCP command set, ``docs/protocol.md`` section 3),
waits for their acknowledgements, times them out and reconnects, whatever the family. An
OFCP device understands those commands itself; this driver carries them to a FOREO device,
whose whole public interface is one characteristic written with response
(:mod:`protocols.foreo`):

=================  ================================================================
SET_INTENSITY n    ``[0x01, mode, speed]`` with the device's step for level n
                   (:func:`~devicebridge.core.catalogue.device_intensity`) when the
                   motor is on (mode vibration), else nothing to write
SET_MODE           vibration: the motor runs at the intensity; off: speed 0;
                   percussion, pulse: NOT_SUPPORTED (one vibration output)
STOP_ALL           ``[0x01, mode, 0]``, always written
SET_ZONE           nothing to write (the device has no zones): OK
START/STOP_STREAM  OK: there is no telemetry to stream
PING               a read of the battery level (a round trip)
anything else      NOT_SUPPORTED (LED, backfill, device programs)
=================  ================================================================

The write's response is the acknowledgement: the driver hands the session an OFCP
acknowledgement once the write completed (OK), or NOT_SUPPORTED when the device refused
the write at the attribute level (it differs from the public description; logged with
how to report it). ``mode`` is the byte the catalogue gives the advertised name.

Whenever the link comes up (first connect and every reconnect) the driver writes speed 0
before anything else: with nothing measured, the bridge never leaves running a motor it
could not watch. A FOREO device exposes no serial number that anything public describes, so
the device is known by the catalogue's identity rule (``foreo@<address>``) and found again
by its address (on macOS, the UUID CoreBluetooth gives it on that Mac).
"""

from __future__ import annotations

import logging
from typing import Final

from bleak.exc import BleakError, BleakGATTProtocolError

from devicebridge.clock import Clock
from devicebridge.core.catalogue import (
    DeviceFamily,
    DeviceModel,
    KindSupport,
    capabilities_of,
    device_identity,
    device_intensity,
)
from devicebridge.core.routine import DeviceKindName
from devicebridge.device.transport.base import DeviceInfo
from devicebridge.device.transport.ble import (
    DEFAULT_FIND_TIMEOUT_S,
    BleBackends,
    DiscoveredDevice,
    GattTransport,
)
from devicebridge.errors import ConnectionLostError, TransportError
from protocols import (
    PROTOCOL_VERSION,
    Ack,
    Command,
    CommandBody,
    DeviceKind,
    DeviceProfile,
    GetInfo,
    MassageMode,
    Ping,
    ProtocolError,
    ResultCode,
    SetIntensity,
    SetMode,
    SetZone,
    StartStream,
    StopAll,
    StopStream,
    decode_message,
)
from protocols.foreo import VibratePacket

_LOGGER = logging.getLogger(__name__)

REPORT_MISMATCH: Final = (
    "real FOREO devices may differ from the public description this driver follows: "
    "please report it (docs/devices.md, 'When a device differs')"
)


class ForeoTransport(GattTransport):
    """One FOREO device (see the module doc).

    ``address`` finds a paired device again; ``device`` (a fresh scan result of this
    family) saves the first scan. ``family`` is the catalogue's FOREO entry.
    """

    def __init__(
        self,
        clock: Clock,
        family: DeviceFamily,
        *,
        address: str | None = None,
        device: DiscoveredDevice | None = None,
        backends: BleBackends | None = None,
        find_timeout_s: float = DEFAULT_FIND_TIMEOUT_S,
    ) -> None:
        if address is None and device is None:
            raise ValueError("ForeoTransport needs an address or a scanned device")
        super().__init__(
            clock,
            address=address,
            device=device,
            backends=backends,
            find_timeout_s=find_timeout_s,
        )
        support = family.support(DeviceKindName.MASSAGER)
        if support is None:
            raise ValueError(f"{family.label} declares no massager")
        self.family = family
        self.support: KindSupport = support
        self._service_uuid = family.gatt["service"]
        self._control_uuid = family.gatt["control"]
        self._battery_uuid = family.gatt["battery_level"]
        self._name = device.name if device is not None else None
        self._model: DeviceModel | None = device.match.model if device and device.match else None
        self._motor_mode = MassageMode.OFF
        self._level = 0
        self._speed_written: int | None = None
        self._battery: int | None = None
        self._refusals_logged = False

    # ------------------------------------------------------------------ identity

    @property
    def description(self) -> str:
        name = self._name or self.family.name
        return f"BLE {name} ({self._address or '?'})"

    @property
    def identity(self) -> str:
        """What the registry knows this device by (the catalogue's identity rule)."""
        return device_identity(self.family, None, self._address or "?")

    @property
    def mode_byte(self) -> int:
        """The packet's mode byte for this device's advertised name (catalogue)."""
        if self._model is None:
            raise TransportError(
                "its advertised name is not in the catalogue: no mode byte is known",
                device=self.description,
            )
        return self._model.options["mode"]

    @property
    def max_program_chunk_bytes(self) -> int:
        return 0  # no device programs

    def _is_target(self, device: DiscoveredDevice) -> bool:
        return (
            device.match is not None
            and device.match.family.id == self.family.id
            and super()._is_target(device)
        )

    def _seen(self, device: DiscoveredDevice) -> None:
        super()._seen(device)
        self._name = device.name
        if device.match is not None and device.match.model is not None:
            self._model = device.match.model

    # ------------------------------------------------------------------ link

    async def connect(self) -> None:
        client = await self._open_client()
        control = client.services.get_characteristic(self._control_uuid)
        if control is None or "write" not in control.properties:
            await self.disconnect()
            raise TransportError(
                f"no characteristic {self._control_uuid} written with response in service "
                f"{self._service_uuid}; {REPORT_MISMATCH}",
                device=self.description,
            )
        self._motor_mode, self._level = MassageMode.OFF, 0
        # Stopped first, on every connect: the bridge never resumes a motor it cannot watch.
        try:
            await self._write_speed(0, force=True)
        except BaseException:
            await self.disconnect()
            raise

    async def read_device_info(self) -> DeviceInfo:
        client = self._connected_client()
        battery: int | None = None
        if client.services.get_characteristic(self._battery_uuid) is not None:
            try:
                raw = await self._read(client, self._battery_uuid)
                battery = raw[0] if raw else None
            except TransportError as exc:
                _LOGGER.info("%s: battery level unreadable: %s", self.description, exc)
        self._battery = battery
        model = self._model.name if self._model is not None else self.family.name
        identity = self.identity
        return DeviceInfo(
            serial_number=identity,
            model_number=model,
            firmware_revision="",  # not reported by anything public
            hardware_revision="",
            manufacturer_name=self.family.name,
            battery_percent=battery,
            support=self.support,
            profile=DeviceProfile(
                protocol_version=PROTOCOL_VERSION,
                device_kind=DeviceKind.MASSAGER,
                capabilities=capabilities_of(self.support),
                sample_rate_hz=0,  # it streams nothing
                ring_capacity_samples=0,
                serial_number=identity,
                model_number=model,
                firmware_revision="",
                manufacturer_name=self.family.name,
            ),
        )

    # ------------------------------------------------------------------ commands

    async def write_control(self, data: bytes) -> None:
        """Carry one command (see the module doc) and hand back its acknowledgement."""
        try:
            message = decode_message(data)
            if not isinstance(message, Command):
                raise TransportError("only commands are written", device=self.description)
            body = message.body()
        except ProtocolError as exc:
            raise TransportError(f"not a command: {exc}", device=self.description) from exc
        result, payload = await self._execute(body)
        if self._on_message is not None:
            self._on_message(Ack(message.command_id, message.opcode, result, payload).encode())

    async def write_program_chunk(self, data: bytes) -> None:
        raise TransportError("FOREO devices take no device programs", device=self.description)

    async def _execute(self, body: CommandBody) -> tuple[ResultCode, bytes]:
        match body:
            case SetIntensity(level=level):
                self._level = level
                return await self._apply()
            case SetMode(mode=mode):
                if mode not in (MassageMode.OFF, MassageMode.VIBRATION):
                    return ResultCode.NOT_SUPPORTED, b""
                self._motor_mode = MassageMode(mode)
                return await self._apply()
            case StopAll():
                self._motor_mode, self._level = MassageMode.OFF, 0
                return await self._write_speed(0, force=True)
            case SetZone() | StartStream() | StopStream():
                return ResultCode.OK, b""
            case Ping():
                client = self._connected_client()
                await self._read(client, self._battery_uuid)
                return ResultCode.OK, b""
            case GetInfo():
                return ResultCode.OK, (await self.read_device_info()).profile.encode()
        return ResultCode.NOT_SUPPORTED, b""

    async def _apply(self) -> tuple[ResultCode, bytes]:
        running = self._motor_mode is MassageMode.VIBRATION
        speed = device_intensity(self.support, self._level) if running else 0
        return await self._write_speed(speed)

    async def _write_speed(self, speed: int, *, force: bool = False) -> tuple[ResultCode, bytes]:
        if speed == self._speed_written and not force:
            return ResultCode.OK, b""
        packet = VibratePacket(self.mode_byte, speed).encode()
        client = self._connected_client()
        self._speed_written = None  # unknown until the device answers
        try:
            await self._paired_if_needed(
                client,
                lambda: client.write_gatt_char(self._control_uuid, packet, response=True),
            )
        except BleakGATTProtocolError as exc:
            if not self._refusals_logged:
                self._refusals_logged = True
                _LOGGER.warning(
                    "%s: the device refused %s on %s (%s); %s",
                    self.description,
                    packet.hex(" "),
                    self._control_uuid,
                    exc,
                    REPORT_MISMATCH,
                )
            return ResultCode.NOT_SUPPORTED, b""
        except BleakError as exc:
            raise ConnectionLostError(f"write failed: {exc}", device=self.description) from exc
        self._speed_written = speed
        return ResultCode.OK, b""
