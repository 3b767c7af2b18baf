"""The real bleak API (and bleak-retry-connector) against the simulated backend."""

from __future__ import annotations

import numpy as np
import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bleak_retry_connector import establish_connection

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
    MANUFACTURER_ID,
    MANUFACTURER_NAME_CHAR_UUID,
    MODEL_NUMBER_CHAR_UUID,
    PROGRAM_CHAR_UUID,
    SERIAL_NUMBER_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    Ack,
    AdvertisedIdentity,
    Command,
    CommandBody,
    DeviceKind,
    DeviceProfile,
    GetInfo,
    ResultCode,
    StartStream,
    TelemetryBatch,
    decode_message,
    max_samples_per_batch,
)
from protocols.constants import (
    CLIENT_CHARACTERISTIC_CONFIG_UUID,
    SMP_CHARACTERISTIC_UUID,
    SMP_SERVICE_UUID,
)
from simulators import SimulatedDevice, SimulatedWorld, VirtualClock


class HostSide:
    """What a host keeps per connection: decoded notifications by characteristic."""

    def __init__(self, client: BleakClient) -> None:
        self.client = client
        self.received: dict[str, list[object]] = {}
        self.next_id = 1

    def on_notify(self, characteristic: BleakGATTCharacteristic, data: bytearray) -> None:
        assert isinstance(data, bytearray)
        self.received.setdefault(characteristic.uuid, []).append(decode_message(data))

    async def subscribe(self, *uuids: str) -> None:
        for uuid in uuids:
            await self.client.start_notify(uuid, self.on_notify)

    async def command(self, body: CommandBody) -> Ack:
        command_id = self.next_id
        self.next_id += 1
        await self.client.write_gatt_char(
            CONTROL_CHAR_UUID, Command.of(command_id, body).encode(), response=True
        )
        # Delivered synchronously, like BlueZ may: the ack is already here.
        acks = [m for m in self.received.get(CONTROL_CHAR_UUID, []) if isinstance(m, Ack)]
        assert acks
        assert acks[-1].command_id == command_id
        return acks[-1]

    def batches(self) -> list[TelemetryBatch]:
        return [
            m for m in self.received.get(TELEMETRY_CHAR_UUID, []) if isinstance(m, TelemetryBatch)
        ]


def assert_contiguous(batches: list[TelemetryBatch]) -> int:
    assert batches
    expected = batches[0].first_sequence
    for batch in batches:
        assert batch.first_sequence == expected
        expected = batch.end_sequence
    return expected - batches[0].first_sequence


@pytest.fixture
async def three(world: SimulatedWorld) -> list[SimulatedDevice]:
    return [world.add_massager(), world.add_massager(), world.add_mask()]


async def scan(
    world: SimulatedWorld, clock: VirtualClock, duration_s: float = 0.5, **kwargs: object
) -> dict[str, tuple[BLEDevice, AdvertisementData]]:
    scanner = BleakScanner(backend=world.scanner_backend, **kwargs)  # type: ignore[arg-type]
    await scanner.start()
    await clock.advance(duration_s)
    await scanner.stop()
    return scanner.discovered_devices_and_advertisement_data


async def test_scanner_discovers_every_device_with_its_identity(
    world: SimulatedWorld, clock: VirtualClock, three: list[SimulatedDevice]
) -> None:
    heard: list[str] = []
    found = await scan(
        world,
        clock,
        detection_callback=lambda d, a: heard.append(d.address),
        service_uuids=[FACIAL_CARE_SERVICE_UUID],
    )
    assert set(found) == {d.address for d in three}
    kinds = []
    for device in three:
        ble_device, adv = found[device.address]
        assert ble_device.name == adv.local_name == device.name
        assert "path" not in ble_device.details
        assert adv.service_uuids == [FACIAL_CARE_SERVICE_UUID]
        assert adv.platform_data == ()
        assert adv.service_data == {}
        assert -100 <= adv.rssi <= -20
        identity = AdvertisedIdentity.decode(adv.manufacturer_data[MANUFACTURER_ID])
        assert identity.serial_number == device.serial_number
        assert identity.battery_percent == device.battery_percent
        kinds.append(identity.device_kind)
    assert kinds == [DeviceKind.MASSAGER, DeviceKind.MASSAGER, DeviceKind.LED_MASK]
    # Every 0.1 virtual s per device: at 0.1 .. 0.5 s after the scan started.
    assert all(heard.count(d.address) == 5 for d in three)


async def test_service_uuid_filter(
    world: SimulatedWorld, clock: VirtualClock, three: list[SimulatedDevice]
) -> None:
    assert await scan(world, clock, service_uuids=[BATTERY_SERVICE_UUID]) == {}


async def test_connect_reads_battery_information_and_profile(
    world: SimulatedWorld, three: list[SimulatedDevice]
) -> None:
    device = three[0]
    async with BleakClient(device.address, backend=world.client_backend) as client:
        assert client.is_connected
        assert device.is_connected
        assert client.mtu_size == 247
        assert client.name == device.name
        battery = await client.read_gatt_char(BATTERY_LEVEL_CHAR_UUID)
        assert battery == bytearray([device.battery_percent])
        strings = {
            uuid: (await client.read_gatt_char(uuid)).decode()
            for uuid in (
                MANUFACTURER_NAME_CHAR_UUID,
                MODEL_NUMBER_CHAR_UUID,
                SERIAL_NUMBER_CHAR_UUID,
                HARDWARE_REVISION_CHAR_UUID,
                FIRMWARE_REVISION_CHAR_UUID,
            )
        }
        assert strings[SERIAL_NUMBER_CHAR_UUID] == device.serial_number
        assert strings[MODEL_NUMBER_CHAR_UUID] == device.profile.model_number
        assert all(strings.values())
        profile = DeviceProfile.decode(bytes(await client.read_gatt_char(DEVICE_PROFILE_CHAR_UUID)))
        assert profile == device.profile
        assert profile.ring_capacity_samples >= 60 * profile.sample_rate_hz
    assert not device.is_connected


async def test_gatt_database_properties_and_cccds(
    world: SimulatedWorld, three: list[SimulatedDevice]
) -> None:
    async with BleakClient(three[0].address, backend=world.client_backend) as client:
        services = client.services
        assert {s.uuid for s in services} == {
            FACIAL_CARE_SERVICE_UUID,
            BATTERY_SERVICE_UUID,
            DEVICE_INFORMATION_SERVICE_UUID,
            SMP_SERVICE_UUID,  # MCUmgr (simulators.smp)
        }
        expected = {
            DEVICE_PROFILE_CHAR_UUID: ["read"],
            CONTROL_CHAR_UUID: ["write", "notify"],
            TELEMETRY_CHAR_UUID: ["notify"],
            EVENTS_CHAR_UUID: ["notify"],
            PROGRAM_CHAR_UUID: ["write", "notify"],
            BATTERY_LEVEL_CHAR_UUID: ["read", "notify"],
            SERIAL_NUMBER_CHAR_UUID: ["read"],
            SMP_CHARACTERISTIC_UUID: ["write-without-response", "notify"],
        }
        for uuid, properties in expected.items():
            characteristic = services.get_characteristic(uuid)
            assert characteristic is not None
            assert characteristic.properties == properties
            cccd = characteristic.get_descriptor(CLIENT_CHARACTERISTIC_CONFIG_UUID)
            assert (cccd is not None) == ("notify" in properties)
        telemetry = services.get_characteristic(TELEMETRY_CHAR_UUID)
        assert telemetry is not None
        cccd = telemetry.get_descriptor(CLIENT_CHARACTERISTIC_CONFIG_UUID)
        assert cccd is not None
        assert await client.read_gatt_descriptor(cccd.handle) == bytearray(b"\x00\x00")
        await client.start_notify(telemetry, lambda c, d: None)
        assert await client.read_gatt_descriptor(cccd.handle) == bytearray(b"\x01\x00")
        await client.stop_notify(telemetry)
        assert await client.read_gatt_descriptor(cccd.handle) == bytearray(b"\x00\x00")
        with pytest.raises(BleakGATTProtocolError):
            await client.read_gatt_char(CONTROL_CHAR_UUID)
        with pytest.raises(BleakGATTProtocolError):
            await client.write_gatt_char(SERIAL_NUMBER_CHAR_UUID, b"x", response=True)
        with pytest.raises(BleakError):
            await client.write_gatt_char(CONTROL_CHAR_UUID, b"\x01\x00\x00\x05", response=False)
        with pytest.raises(BleakGATTProtocolError):
            await client.write_gatt_char(CONTROL_CHAR_UUID, bytes(513), response=True)


async def test_stream_ten_virtual_seconds_contiguous(
    world: SimulatedWorld, clock: VirtualClock, three: list[SimulatedDevice]
) -> None:
    found = await scan(world, clock)
    ble_device, _ = found[three[0].address]
    async with BleakClient(ble_device, backend=world.client_backend) as client:
        host = HostSide(client)
        await host.subscribe(CONTROL_CHAR_UUID, TELEMETRY_CHAR_UUID, EVENTS_CHAR_UUID)
        ack = await host.command(GetInfo())
        assert ack.result == ResultCode.OK
        assert DeviceProfile.decode(ack.payload) == three[0].profile
        assert (await host.command(StartStream())).result == ResultCode.OK
        start = three[0].next_sequence
        await clock.advance(10.0)
        batches = host.batches()
        assert assert_contiguous(batches) == 1000
        assert batches[0].first_sequence == start
        assert not any(b.backfill for b in batches)
        assert all(len(b.encode()) <= client.mtu_size - 3 for b in batches)
        times = np.array([b.device_time_ms for b in batches])
        assert np.all(np.diff(times) == 100)


async def test_small_mtu_limits_batches_and_truncates_long_notifications(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    device = world.add_massager(mtu_size=23)
    async with BleakClient(device.address, backend=world.client_backend) as client:
        host = HostSide(client)
        await host.subscribe(TELEMETRY_CHAR_UUID)
        received: list[bytearray] = []
        await client.start_notify(CONTROL_CHAR_UUID, lambda c, d: received.append(d))
        await client.write_gatt_char(
            CONTROL_CHAR_UUID, Command.of(1, GetInfo()).encode(), response=True
        )
        assert len(received[-1]) == 20  # a long ack is cut to MTU - 3, as on air
        await client.write_gatt_char(
            CONTROL_CHAR_UUID, Command.of(2, StartStream()).encode(), response=True
        )
        await clock.advance(1.0)
        batches = host.batches()
        per_batch = max_samples_per_batch(device.sample_format, 20)
        assert {len(b) for b in batches} == {per_batch}
        assert assert_contiguous(batches) == 100


async def test_connect_unknown_or_out_of_range_raises_not_found(
    world: SimulatedWorld, clock: VirtualClock, three: list[SimulatedDevice]
) -> None:
    with pytest.raises(BleakDeviceNotFoundError):
        await BleakClient("SI:MU:FF:FF:00:00", backend=world.client_backend).connect()
    world.set_in_range(three[1], False)
    with pytest.raises(BleakDeviceNotFoundError):
        await BleakClient(three[1].address, backend=world.client_backend).connect()
    world.set_in_range(three[1], True)
    client = BleakClient(three[1].address, backend=world.client_backend)
    await client.connect()
    with pytest.raises(BleakError):
        await BleakClient(three[1].address, backend=world.client_backend).connect()
    await client.disconnect()


async def test_drop_link(
    world: SimulatedWorld, clock: VirtualClock, three: list[SimulatedDevice]
) -> None:
    device = three[0]
    disconnects: list[BleakClient] = []
    client = BleakClient(
        device.address, disconnected_callback=disconnects.append, backend=world.client_backend
    )
    await client.connect()
    host = HostSide(client)
    await host.subscribe(CONTROL_CHAR_UUID, TELEMETRY_CHAR_UUID)
    await host.command(StartStream())
    await clock.advance(1.0)
    before = len(host.batches())
    sequence_at_drop = device.next_sequence

    world.drop_link(device, out_of_range_s=2.0)
    assert disconnects == [client]
    assert not client.is_connected
    assert not device.is_connected
    with pytest.raises(BleakDeviceNotFoundError):
        await client.connect()
    # Out of range: no advertisements, and the ring keeps filling.
    assert device.address not in await scan(world, clock, duration_s=1.0)
    assert device.next_sequence >= sequence_at_drop + 100
    assert len(host.batches()) == before
    await clock.advance(1.1)
    assert device.address in await scan(world, clock, duration_s=0.2)

    await client.connect()
    # bleak does not re-enable notifications: nothing arrives until start_notify.
    await client.write_gatt_char(
        CONTROL_CHAR_UUID, Command.of(99, StartStream()).encode(), response=True
    )
    await clock.advance(0.5)
    assert len(host.batches()) == before
    assert device.is_streaming
    await host.subscribe(TELEMETRY_CHAR_UUID)
    await clock.advance(0.5)
    assert len(host.batches()) > before
    await client.disconnect()
    # BlueZ calls the callback on a disconnect the host asked for, too.
    assert disconnects == [client, client]


async def test_bleak_retry_connector_establish_connection(
    world: SimulatedWorld, clock: VirtualClock, three: list[SimulatedDevice]
) -> None:
    ble_device, _ = (await scan(world, clock))[three[2].address]
    client = await establish_connection(
        BleakClient, ble_device, three[2].name, backend=world.client_backend
    )
    try:
        assert client.is_connected
        assert (await client.read_gatt_char(SERIAL_NUMBER_CHAR_UUID)).decode() == (
            three[2].serial_number
        )
    finally:
        await client.disconnect()


async def test_a_raising_host_callback_is_reported_not_fatal_to_the_device(
    clock: VirtualClock,
) -> None:
    world = SimulatedWorld(seed=5, clock=clock)
    device = world.add_massager()

    def broken(characteristic: BleakGATTCharacteristic, data: bytearray) -> None:
        raise ValueError("host bug")

    world.start()
    client = BleakClient(device.address, backend=world.client_backend)
    await client.connect()
    await client.start_notify(TELEMETRY_CHAR_UUID, broken)
    await client.write_gatt_char(
        CONTROL_CHAR_UUID, Command.of(1, StartStream()).encode(), response=True
    )
    await clock.advance(1.0)
    assert device.task_exception() is None
    assert device.next_sequence == 100
    with pytest.raises(RuntimeError, match="callback") as caught:
        await world.stop()
    assert isinstance(caught.value.__cause__, ValueError)


async def test_advertising_resumes_on_its_grid_when_the_only_device_is_free_again(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    # With every device connected the advertiser sleeps until that changes; it must wake
    # when the link drops and, after the time out of range, advertise on its 0.1 s grid.
    device = world.add_massager()
    client = BleakClient(device.address, backend=world.client_backend)
    await client.connect()
    await clock.advance(5.0)  # nobody advertises: the advertiser is parked
    heard_at: list[float] = []
    scanner = BleakScanner(
        backend=world.scanner_backend,  # type: ignore[arg-type]
        detection_callback=lambda d, a: heard_at.append(clock.now_s()),
    )
    await scanner.start()
    world.drop_link(device, out_of_range_s=1.25)
    dropped_at = clock.now_s()
    await clock.advance(2.0)
    await scanner.stop()
    assert heard_at, "the device never advertised again"
    assert heard_at[0] >= dropped_at + 1.25
    assert heard_at[0] == pytest.approx(round(heard_at[0] / 0.1) * 0.1, abs=1e-9)
    assert heard_at[0] - (dropped_at + 1.25) < 0.1 + 1e-9
    # ... and again when the device reconnects and the host closes the link.
    await client.connect()
    await clock.advance(3.0)
    heard_at.clear()
    await scanner.start()
    await client.disconnect()
    await clock.advance(0.3)
    await scanner.stop()
    assert len(heard_at) >= 2
