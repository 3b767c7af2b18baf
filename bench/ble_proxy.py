"""bleak across a process boundary: one process owns the (simulated) devices, another
drives them through the real ``BleakScanner`` / ``BleakClient`` front-ends.

The simulated devices live in the process that runs the simulator, where their
bleak backend is; a client that must run in an environment of its own (smpmgr,
whose pins clash with ours) cannot import that backend. :func:`serve` exposes
any bleak backends on a local TCP port; :func:`bind` gives the other process
scanner and client backend classes that forward every GATT operation to it. Both
halves import only bleak and the standard library, so this file runs in either
environment (the bench's uploaders put its directory on ``sys.path``).

Wire format: frames of ``u32 length, u8 kind, payload``. Kind 0 is a JSON
request, answer or event (bytes as hex); kind 1 is a write without response and
kind 2 a notification, both ``u16 handle`` then the data, so the bulk of an
upload is neither JSON-encoded nor waits for an answer (as a write command
does not on air). A single connection carries one scanner or one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Final

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError

LOCALHOST: Final = "127.0.0.1"
# protocols.constants.ATT_HEADER_BYTES: this file also runs in smpmgr's own environment,
# where the project is not installed (tests/firmware checks the two agree).
ATT_HEADER_BYTES: Final = 3
_FRAME: Final = struct.Struct("!IB")
_HANDLE: Final = struct.Struct("!H")
CONTROL: Final = 0
WRITE_COMMAND: Final = 1
NOTIFICATION: Final = 2


def _frame(kind: int, payload: bytes) -> bytes:
    return _FRAME.pack(len(payload) + 1, kind) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    length, kind = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    return kind, await reader.readexactly(length - 1)


def _control(message: dict[str, Any]) -> bytes:
    return _frame(CONTROL, json.dumps(message).encode())


# --------------------------------------------------------------------------- the server


async def serve(
    scanner_backend: type[BaseBleakScanner],
    client_backend: type[BaseBleakClient],
    *,
    host: str = LOCALHOST,
    port: int = 0,
) -> asyncio.Server:
    """Serve the devices behind these backends on ``host:port`` (0: a free port)."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _Session(reader, writer, scanner_backend, client_backend).run()

    return await asyncio.start_server(session, host, port)


class _Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        scanner_backend: type[BaseBleakScanner],
        client_backend: type[BaseBleakClient],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.scanner_backend = scanner_backend
        self.client_backend = client_backend
        self.scanner: BleakScanner | None = None
        self.client: BleakClient | None = None

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        try:
            while True:
                kind, payload = await _read_frame(self.reader)
                if kind == WRITE_COMMAND:
                    await self._write_command(payload)
                elif kind == CONTROL:
                    await self._control(json.loads(payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self.scanner is not None:
                with contextlib.suppress(BleakError):
                    await self.scanner.stop()
            if self.client is not None:
                with contextlib.suppress(BleakError):
                    await self.client.disconnect()
            self.writer.close()

    async def _write_command(self, payload: bytes) -> None:
        client = self.client
        if client is None or not client.is_connected:
            return  # the disconnected event has told (or will tell) the other side
        (handle,) = _HANDLE.unpack_from(payload)
        characteristic = client.services.get_characteristic(handle)
        if characteristic is not None:
            with contextlib.suppress(BleakError):
                await client.write_gatt_char(
                    characteristic, payload[_HANDLE.size :], response=False
                )

    async def _control(self, message: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"id": message.get("id")}
        try:
            answer.update(await self._do(message))
        except (BleakError, TimeoutError, KeyError, ValueError) as exc:
            answer["error"] = f"{type(exc).__name__}: {exc}"
        self.send(_control(answer))

    async def _do(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op == "scan_start":
            self.scanner = BleakScanner(
                detection_callback=self._advertisement,
                service_uuids=message.get("service_uuids"),
                backend=self.scanner_backend,
            )
            await self.scanner.start()
            return {}
        if op == "scan_stop":
            if self.scanner is not None:
                await self.scanner.stop()
            return {}
        if op == "connect":
            self.client = BleakClient(
                message["address"],
                disconnected_callback=lambda _client: self.send(_control({"event": "lost"})),
                backend=self.client_backend,
            )
            await self.client.connect()
            return {"mtu": self.client.mtu_size, "services": _describe(self.client.services)}
        client = self.client
        if client is None:
            raise BleakError("not connected")
        if op == "disconnect":
            await client.disconnect()
            return {}
        handle = int(message["handle"])
        if op == "read_descriptor" or op == "write_descriptor":
            descriptor = client.services.get_descriptor(handle)
            if descriptor is None:
                raise KeyError(f"no descriptor {handle}")
            if op == "read_descriptor":
                return {"data": bytes(await client.read_gatt_descriptor(descriptor)).hex()}
            await client.write_gatt_descriptor(descriptor, bytes.fromhex(message["data"]))
            return {}
        characteristic = client.services.get_characteristic(handle)
        if characteristic is None:
            raise KeyError(f"no characteristic {handle}")
        if op == "read":
            return {"data": bytes(await client.read_gatt_char(characteristic)).hex()}
        if op == "write":
            data = bytes.fromhex(message["data"])
            await client.write_gatt_char(characteristic, data, response=True)
            return {}
        if op == "start_notify":

            def forward(_char: BleakGATTCharacteristic, data: bytearray) -> None:
                self.send(_frame(NOTIFICATION, _HANDLE.pack(handle) + bytes(data)))

            await client.start_notify(characteristic, forward)
            return {}
        if op == "stop_notify":
            await client.stop_notify(characteristic)
            return {}
        raise ValueError(f"unknown operation {op!r}")

    def _advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self.send(
            _control(
                {
                    "event": "adv",
                    "address": device.address,
                    "name": device.name,
                    "local_name": adv.local_name,
                    "manufacturer_data": {
                        str(k): v.hex() for k, v in adv.manufacturer_data.items()
                    },
                    "service_data": {k: v.hex() for k, v in adv.service_data.items()},
                    "service_uuids": adv.service_uuids,
                    "tx_power": adv.tx_power,
                    "rssi": adv.rssi,
                }
            )
        )


def _describe(services: BleakGATTServiceCollection) -> list[dict[str, Any]]:
    return [
        {
            "uuid": service.uuid,
            "handle": service.handle,
            "characteristics": [
                {
                    "uuid": char.uuid,
                    "handle": char.handle,
                    "properties": list(char.properties),
                    "descriptors": [{"uuid": d.uuid, "handle": d.handle} for d in char.descriptors],
                }
                for char in service.characteristics
            ],
        }
        for service in services
    ]


# --------------------------------------------------------------------------- the other side


class _Connection:
    """One TCP connection to the server: requests with answers, and a stream of events."""

    def __init__(
        self,
        on_event: Callable[[dict[str, Any]], None],
        on_notification: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.on_event = on_event
        self.on_notification = on_notification
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, server: tuple[str, int]) -> None:
        reader, self._writer = await asyncio.open_connection(*server)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._writer is None:
            raise BleakError("not connected to the BLE proxy")
        message_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        self._writer.write(_control({"op": op, "id": message_id, **fields}))
        answer = await future
        if "error" in answer:
            raise BleakError(answer["error"])
        return answer

    def write_command(self, handle: int, data: bytes) -> None:
        if self._writer is None:
            raise BleakError("not connected to the BLE proxy")
        self._writer.write(_frame(WRITE_COMMAND, _HANDLE.pack(handle) + data))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, payload = await _read_frame(reader)
                if kind == NOTIFICATION and self.on_notification is not None:
                    (handle,) = _HANDLE.unpack_from(payload)
                    self.on_notification(handle, payload[_HANDLE.size :])
                elif kind == CONTROL:
                    message = json.loads(payload)
                    future = self._waiting.pop(message.get("id", -1), None)
                    if future is not None:
                        future.set_result(message)
                    elif "event" in message:
                        self.on_event(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.on_event({"event": "lost"})
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(BleakError("the BLE proxy closed the connection"))


class ProxyBleakScanner(BaseBleakScanner):
    """Scanner backend forwarding to a :func:`serve`; use :func:`bind` to get one."""

    server: ClassVar[tuple[str, int]]

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._connection: _Connection | None = None

    async def start(self) -> None:
        self.seen_devices = {}
        self._connection = _Connection(self._on_event)
        await self._connection.open(self.server)
        await self._connection.request("scan_start", service_uuids=self._service_uuids)

    async def stop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(BleakError):
                await connection.request("scan_stop")
            await connection.close()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") != "adv":
            return
        adv = AdvertisementData(
            local_name=event["local_name"],
            manufacturer_data={
                int(k): bytes.fromhex(v) for k, v in event["manufacturer_data"].items()
            },
            service_data={k: bytes.fromhex(v) for k, v in event["service_data"].items()},
            service_uuids=event["service_uuids"],
            tx_power=event["tx_power"],
            rssi=event["rssi"],
            platform_data=(),
        )
        if not self.is_allowed_uuid(adv.service_uuids):
            return
        device = self.create_or_update_device(
            event["address"], event["address"], event["name"], {"proxy": True}, adv
        )
        self.call_detection_callbacks(device, adv)


class ProxyBleakClient(BaseBleakClient):
    """Client backend forwarding to a :func:`serve`; use :func:`bind` to get one."""

    server: ClassVar[tuple[str, int]]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout
        )
        self._connection: _Connection | None = None
        self._mtu = 23
        self._callbacks: dict[int, NotifyCallback] = {}

    @property
    def mtu_size(self) -> int:
        return self._mtu

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    async def connect(self, pair: bool = False, **kwargs: Any) -> None:
        connection = _Connection(self._on_event, self._on_notification)
        await connection.open(self.server)
        try:
            answer = await connection.request("connect", address=self.address)
        except BleakError as exc:
            await connection.close()
            raise BleakDeviceNotFoundError(self.address, str(exc)) from exc
        self._connection = connection
        self._mtu = int(answer["mtu"])
        self._callbacks.clear()
        self.services = self._build_services(answer["services"])

    def _build_services(self, described: list[dict[str, Any]]) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        for service_info in described:
            service = BleakGATTService(None, service_info["handle"], service_info["uuid"])
            collection.add_service(service)
            for info in service_info["characteristics"]:
                characteristic = BleakGATTCharacteristic(
                    None,
                    info["handle"],
                    info["uuid"],
                    info["properties"],
                    lambda: self._mtu - ATT_HEADER_BYTES,
                    service,
                )
                collection.add_characteristic(characteristic)
                for descriptor in info["descriptors"]:
                    collection.add_descriptor(
                        BleakGATTDescriptor(
                            None, descriptor["handle"], descriptor["uuid"], characteristic
                        )
                    )
        return collection

    async def disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with contextlib.suppress(BleakError):
            await connection.request("disconnect")
        await connection.close()
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "lost" and self._connection is not None:
            connection, self._connection = self._connection, None
            asyncio.get_running_loop().create_task(connection.close())
            if self._disconnected_callback is not None:
                self._disconnected_callback()

    def _on_notification(self, handle: int, data: bytes) -> None:
        callback = self._callbacks.get(handle)
        if callback is not None:
            callback(bytearray(data))

    def _require(self) -> _Connection:
        if self._connection is None:
            raise BleakError("Not connected")
        return self._connection

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """The simulated devices need no pairing."""

    async def unpair(self) -> None:
        """Nothing is stored to forget."""

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, **kwargs: Any
    ) -> bytearray:
        answer = await self._require().request("read", handle=characteristic.handle)
        return bytearray.fromhex(answer["data"])

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        payload = bytes(data)
        if response:
            await self._require().request("write", handle=characteristic.handle, data=payload.hex())
        else:
            self._require().write_command(characteristic.handle, payload)

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, **kwargs: Any
    ) -> bytearray:
        answer = await self._require().request("read_descriptor", handle=descriptor.handle)
        return bytearray.fromhex(answer["data"])

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        await self._require().request(
            "write_descriptor", handle=descriptor.handle, data=bytes(data).hex()
        )

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        self._callbacks[characteristic.handle] = callback
        await self._require().request("start_notify", handle=characteristic.handle)

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._callbacks.pop(characteristic.handle, None)
        await self._require().request("stop_notify", handle=characteristic.handle)


def bind(server: tuple[str, int]) -> tuple[type[ProxyBleakScanner], type[ProxyBleakClient]]:
    """Scanner and client backend classes that reach the devices served at ``server``."""
    scanner = type("ProxyBleakScanner", (ProxyBleakScanner,), {"server": server})
    client = type("ProxyBleakClient", (ProxyBleakClient,), {"server": server})
    return scanner, client
