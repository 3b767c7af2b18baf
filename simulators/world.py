"""The simulated room: devices, their radio range, and the bleak backends that reach them."""

from __future__ import annotations

import asyncio
import functools
import math
from types import TracebackType
from typing import Final, TypeVar, Unpack

from bleak.backends.scanner import AdvertisementData

from protocols import FACIAL_CARE_SERVICE_UUID, MANUFACTURER_ID
from simulators.clock import VirtualClock
from simulators.devices.device import DeviceOptions, SimulatedDevice
from simulators.devices.fleet import MassagerFleet
from simulators.devices.foreo import DEFAULT_NAME as FOREO_DEFAULT_NAME
from simulators.devices.foreo import SimulatedForeo
from simulators.devices.hand import HandScript
from simulators.devices.mask import SimulatedLedMask
from simulators.devices.massager import SimulatedMassager
from simulators.links.bleak_backend import (
    Peripheral,
    SimulatedBleakClient,
    SimulatedBleakScanner,
    bind_client,
    bind_scanner,
)
from simulators.smp.firmware import SmpFirmware

ADVERTISING_INTERVAL_S: Final = 0.1
# A time this close past an advertising tick counts as that tick (float error of t / interval).
GRID_TOLERANCE: Final = 1e-9
RSSI_NOISE_DB: Final = 3.0
RSSI_LIMITS_DBM: Final = (-100, -20)
TX_POWER_DBM: Final = 0

D = TypeVar("D", bound=SimulatedDevice)


class SimulatedWorld:
    """Devices that share one clock and one seed.

    Devices get identities, noise and hand scripts from ``seed`` and the order
    they are added in, so the same calls on the same seed give the same devices
    and the same telemetry bytes. Its massagers take their samples together
    (:attr:`fleet`; ``fleet_generation=False``: each on its own, the same bytes).
    """

    def __init__(
        self,
        seed: int = 0,
        clock: VirtualClock | None = None,
        *,
        advertising_interval_s: float = ADVERTISING_INTERVAL_S,
        connect_latency_s: float = 0.0,
        fleet_generation: bool = True,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed = seed
        self.clock = clock if clock is not None else VirtualClock()
        self.advertising_interval_s = advertising_interval_s
        # Zero by default: a connect that waits on virtual time would hang a test
        # that does not drive the clock while it connects.
        self.connect_latency_s = connect_latency_s
        # Massagers take their samples together at their ticks (simulators.devices.fleet);
        # False: each on its own (the same bytes, for comparing the two).
        self.fleet: MassagerFleet | None = MassagerFleet() if fleet_generation else None
        self.devices: list[SimulatedDevice] = []  # OFCP firmware
        self.foreo_devices: list[SimulatedForeo] = []
        self._by_address: dict[str, Peripheral] = {}
        self._smp: dict[str, SmpFirmware] = {}
        self._scanners: list[SimulatedBleakScanner] = []
        self._connections: dict[str, SimulatedBleakClient] = {}
        self._out_of_range_until_s: dict[str, float] = {}
        self._out_of_reach: set[str] = set()
        self._advertiser: asyncio.Task[None] | None = None
        self._advertising_may_change = asyncio.Event()
        self._running = False
        self.callback_errors: list[Exception] = []

    # ------------------------------------------------------------------ devices

    def add_massager(
        self, *, hand: HandScript | None = None, **options: Unpack[DeviceOptions]
    ) -> SimulatedMassager:
        options.setdefault("seed", self.seed)
        options.setdefault("index", len(self.all_devices))
        device = self._add(SimulatedMassager(self.clock, hand=hand, **options))
        if self.fleet is not None:
            self.fleet.add(device)
        return device

    def add_mask(self, *, worn: bool = True, **options: Unpack[DeviceOptions]) -> SimulatedLedMask:
        options.setdefault("seed", self.seed)
        options.setdefault("index", len(self.all_devices))
        return self._add(SimulatedLedMask(self.clock, worn=worn, **options))

    def add_foreo(
        self, *, name: str = FOREO_DEFAULT_NAME, battery_percent: float | None = None
    ) -> SimulatedForeo:
        """A FOREO device advertising ``name`` (simulators/devices/foreo.py); in-process
        backend only (the link-level world has no FOREO peripheral)."""
        device = SimulatedForeo(
            self.clock,
            name=name,
            seed=self.seed,
            index=len(self.all_devices),
            battery_percent=battery_percent,
        )
        if device.address in self._by_address:
            raise ValueError(f"a device with address {device.address} is already in the world")
        self.foreo_devices.append(device)
        self._by_address[device.address] = device
        device.presence_listeners.append(self._advertising_may_change.set)
        if self._running:
            device.start()
        return device

    def _add(self, device: D) -> D:
        if device.address in self._by_address:
            raise ValueError(f"a device with address {device.address} is already in the world")
        self.devices.append(device)
        self._by_address[device.address] = device
        device.presence_listeners.append(self._advertising_may_change.set)
        self._smp[device.address] = SmpFirmware(device)
        if self._running:
            device.start()
        return device

    @property
    def all_devices(self) -> list[Peripheral]:
        """Every device in the world, of any family, in the order added."""
        return [*self.devices, *self.foreo_devices]

    def device_by_address(self, address: str) -> SimulatedDevice | None:
        """The OFCP device at ``address`` (None: none, or a device of another family)."""
        device = self._by_address.get(address.upper())
        return device if isinstance(device, SimulatedDevice) else None

    def peripheral_by_address(self, address: str) -> Peripheral | None:
        """The device of any family at ``address``."""
        return self._by_address.get(address.upper())

    def smp_firmware(self, device: SimulatedDevice) -> SmpFirmware:
        """The device's MCUboot slots and SMP server (reached over GATT, a pty or UDP)."""
        return self._smp[device.address]

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SimulatedWorld:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def start(self) -> None:
        """Boot every device and start advertising (tasks on the current loop)."""
        if self._running:
            return
        self._running = True
        for device in self.all_devices:
            device.start()
        self._advertiser = asyncio.get_running_loop().create_task(
            self._advertise_forever(), name="SimulatedWorld advertiser"
        )

    async def stop(self) -> None:
        """Close every connection quietly and stop all tasks.

        Raises the first exception a device task died of, so a crash in the
        simulator never passes for a host bug (or for a pass).
        """
        self._running = False
        for client in list(self._connections.values()):
            client.close_quietly()
        advertiser, self._advertiser = self._advertiser, None
        crashed = [d.task_exception() for d in self.all_devices]
        if advertiser is not None:
            if advertiser.done() and not advertiser.cancelled():
                crashed.append(advertiser.exception())
            advertiser.cancel()
            await asyncio.gather(advertiser, return_exceptions=True)
        smp_errors: list[BaseException] = []
        for firmware in self._smp.values():
            try:
                await firmware.stop()
            except RuntimeError as exc:
                smp_errors.append(exc)
        for peripheral in self.all_devices:
            await peripheral.stop()
        crashed.extend(smp_errors)
        for error in crashed:
            if error is not None:
                raise RuntimeError("a simulator task crashed") from error
        if self.callback_errors:
            raise RuntimeError(
                f"{len(self.callback_errors)} host notification callback(s) raised"
            ) from self.callback_errors[0]

    def record_callback_error(self, error: Exception) -> None:
        """A host callback raised while the backend delivered to it."""
        self.callback_errors.append(error)
        asyncio.get_running_loop().call_exception_handler(
            {"message": "host notification callback raised", "exception": error}
        )

    # ------------------------------------------------------------------ bleak backends

    @functools.cached_property
    def scanner_backend(self) -> type[SimulatedBleakScanner]:
        """Pass as ``BleakScanner(backend=world.scanner_backend)``."""
        return bind_scanner(self)

    @functools.cached_property
    def client_backend(self) -> type[SimulatedBleakClient]:
        """Pass as ``BleakClient(device, backend=world.client_backend)``."""
        return bind_client(self)

    def add_scanner(self, scanner: SimulatedBleakScanner) -> None:
        if scanner not in self._scanners:
            self._scanners.append(scanner)

    def remove_scanner(self, scanner: SimulatedBleakScanner) -> None:
        if scanner in self._scanners:
            self._scanners.remove(scanner)

    def register_connection(self, device: Peripheral, client: SimulatedBleakClient) -> None:
        self._connections[device.address] = client

    def unregister_connection(self, device: Peripheral, client: SimulatedBleakClient) -> None:
        if self._connections.get(device.address) is client:
            del self._connections[device.address]

    def client_of(self, device: Peripheral) -> SimulatedBleakClient | None:
        """The backend client connected to ``device`` over BLE, if any."""
        return self._connections.get(device.address)

    async def connect_delay(self) -> None:
        if self.connect_latency_s > 0:
            await self.clock.sleep(self.connect_latency_s)

    # ------------------------------------------------------------------ radio range

    def is_in_range(self, device: Peripheral) -> bool:
        if device.address in self._out_of_reach:
            return False
        return self.clock.now_s() >= self._out_of_range_until_s.get(device.address, 0.0)

    def is_connectable(self, device: Peripheral) -> bool:
        return device.is_powered and self.is_in_range(device) and not device.is_connected

    def drop_link(self, device: Peripheral, out_of_range_s: float = 0.0) -> None:
        """Lose the BLE link now, as when the user walks away.

        The host's disconnected callback runs; the device forgets its streaming
        state and subscriptions, stops advertising and refuses connects for
        ``out_of_range_s`` virtual seconds, and keeps sampling into its ring.
        """
        if out_of_range_s > 0:
            self._out_of_range_until_s[device.address] = self.clock.now_s() + out_of_range_s
            self._advertising_may_change.set()
        client = self._connections.get(device.address)
        if client is not None:
            client.link_lost()

    def set_in_range(self, device: Peripheral, in_range: bool) -> None:
        """Take a device out of reach until put back (drops its BLE link)."""
        self._advertising_may_change.set()
        if in_range:
            self._out_of_reach.discard(device.address)
            self._out_of_range_until_s.pop(device.address, None)
            return
        self._out_of_reach.add(device.address)
        self.drop_link(device)

    # ------------------------------------------------------------------ advertising

    async def _advertise_forever(self) -> None:
        start_s = self.clock.now_s()
        interval_s = self.advertising_interval_s
        tick = 0
        while True:
            self._advertise_once()
            tick += 1
            # While no device advertises (all connected, off or out of range), sleep until
            # that may change instead of waking every interval for nothing. Advertising
            # stays on the same grid, and radio noise is drawn only for devices that
            # advertise, so the run is the same.
            self._advertising_may_change.clear()
            if not any(self.is_connectable(device) for device in self.all_devices):
                await self._until_advertising_may_change()
                due = math.ceil((self.clock.now_s() - start_s) / interval_s - GRID_TOLERANCE)
                tick = max(tick, due)
            await self.clock.sleep_until(start_s + tick * interval_s)

    async def _until_advertising_may_change(self) -> None:
        """A device powers on, loses its link or comes back in range (or its time out of
        range ends, which no event announces)."""
        now_s = self.clock.now_s()
        waits: list[asyncio.Future[object]] = [
            asyncio.ensure_future(self._advertising_may_change.wait())
        ]
        back_in_range_s = [t for t in self._out_of_range_until_s.values() if t > now_s]
        if back_in_range_s:
            waits.append(asyncio.ensure_future(self.clock.sleep_until(min(back_in_range_s))))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _advertise_once(self) -> None:
        for device in self.all_devices:
            if not self.is_connectable(device):
                continue
            # Drawn whether or not anyone scans, so scanning never shifts the stream.
            noise_db = float(device.radio_rng.normal(0.0, RSSI_NOISE_DB))
            if not self._scanners:
                continue
            rssi = round(
                min(
                    max(device.identity.base_rssi_dbm + noise_db, RSSI_LIMITS_DBM[0]),
                    RSSI_LIMITS_DBM[1],
                )
            )
            if isinstance(device, SimulatedForeo):
                # Its name alone: nothing public says what else a FOREO advertises.
                manufacturer: dict[int, bytes] = {}
                services: list[str] = []
            else:
                manufacturer = {MANUFACTURER_ID: device.advertised_identity().encode()}
                services = [FACIAL_CARE_SERVICE_UUID]
            advertisement = AdvertisementData(
                local_name=device.name,
                manufacturer_data=manufacturer,
                service_data={},
                service_uuids=services,
                tx_power=TX_POWER_DBM,
                rssi=rssi,
                platform_data=(),
            )
            for scanner in list(self._scanners):
                scanner.receive_advertisement(device, advertisement)
