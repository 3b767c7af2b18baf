"""A :class:`~simulators.world.SimulatedWorld` whose devices sit behind virtual controllers.

Same devices, same seed, same API (``add_massager``, ``scanner_backend``,
``client_backend``, ``drop_link``, ...), but every device is a bumble
peripheral with its own controller on an in-memory :class:`bumble.link.LocalLink`
and the backends drive a bumble central on that link, so the host's traffic is
real HCI, link-layer, ATT and GATT packets.

Time: bumble runs on asyncio in real time (advertising intervals, request
timeouts), the devices sample on the :class:`~simulators.clock.VirtualClock`.
The world therefore needs the clock in realtime mode; at ``speed`` 10 (the
default of :func:`link_level_clock`) a minute of device time takes six
seconds, a 2 s command timeout is 200 ms of wall time (hundreds of ATT round
trips), and nothing in a test waits on the wall clock for correctness: waits
are on the virtual clock or on events. Virtual advertising intervals become
wall-clock intervals divided by ``speed``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Final, TypeVar

from bumble import hci
from bumble.link import LocalLink

from simulators.clock import VirtualClock
from simulators.devices.device import SimulatedDevice
from simulators.devices.foreo import SimulatedForeo
from simulators.errors import SimulatorError
from simulators.linklevel.central import (
    CENTRAL_ADDRESS,
    DEFAULT_REQUESTED_MTU,
    LinkLevelBleakClient,
    LinkLevelBleakScanner,
    LinkLevelCentral,
    bind_client,
    bind_scanner,
)
from simulators.linklevel.gatt import ENCRYPTED_CHAR_UUIDS
from simulators.linklevel.inflight import InFlight
from simulators.linklevel.peripheral import LinkLevelPeripheral
from simulators.world import ADVERTISING_INTERVAL_S, SimulatedWorld

DEFAULT_SPEED: Final = 10.0
# Floor of a wall-clock advertising interval (bumble would spin on zero).
MIN_ADVERTISING_INTERVAL_S: Final = 0.005
# Random static addresses have the two top bits set; the rest is the device's
# own address after its "SI:MU" prefix, so every device of a world differs.
D = TypeVar("D", bound=SimulatedDevice)
CONTROLLER_ADDRESS_PREFIX: Final = "C5:1A"
SIMULATED_ADDRESS_PREFIX_LENGTH: Final = len("SI:MU")


def link_level_clock(speed: float = DEFAULT_SPEED) -> VirtualClock:
    """The clock link-level mode runs on: realtime, ``speed`` times the wall clock."""
    return VirtualClock(realtime=True, speed=speed)


def quiet_bumble() -> None:
    """bumble logs every packet at DEBUG; keep it at WARNING unless configured."""
    logger = logging.getLogger("bumble")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def controller_address(device: SimulatedDevice) -> str:
    """The on-air (random static) address of ``device``'s controller."""
    return CONTROLLER_ADDRESS_PREFIX + device.address[SIMULATED_ADDRESS_PREFIX_LENGTH:]


class LinkLevelWorld(SimulatedWorld):
    """Simulated devices reached through virtual Bluetooth controllers (bumble).

    ``encrypted_uuids`` are the characteristics that need an encrypted link
    (default: Control); ``requested_mtu`` is what the central asks for at
    connect (``None``: no exchange, ATT MTU stays 23). Add devices before
    entering the world.
    """

    def __init__(
        self,
        seed: int = 0,
        clock: VirtualClock | None = None,
        *,
        advertising_interval_s: float = ADVERTISING_INTERVAL_S,
        encrypted_uuids: frozenset[str] = ENCRYPTED_CHAR_UUIDS,
        requested_mtu: int | None = DEFAULT_REQUESTED_MTU,
    ) -> None:
        clock = clock if clock is not None else link_level_clock()
        if not clock.realtime:
            raise ValueError(
                "LinkLevelWorld needs a realtime VirtualClock (bumble runs on the wall "
                "clock): use simulators.linklevel.link_level_clock() or "
                "VirtualClock(realtime=True, speed=...)"
            )
        super().__init__(seed, clock, advertising_interval_s=advertising_interval_s)
        self.encrypted_uuids = encrypted_uuids
        self.link: LocalLink | None = None
        self.in_flight = InFlight()
        self.central = LinkLevelCentral(
            address=CENTRAL_ADDRESS,
            requested_mtu=requested_mtu,
            resolve_address=self._on_air_address,
            peer_detached=self._peer_detached,
            notification_received=self.in_flight.done,
        )
        self.peripherals: dict[str, LinkLevelPeripheral] = {}  # by on-air address
        quiet_bumble()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> LinkLevelWorld:
        await self.open()
        return self

    def start(self) -> None:
        raise RuntimeError("a LinkLevelWorld starts asynchronously: use 'async with' or open()")

    async def open(self) -> None:
        """Power on the link, the central and one peripheral per device; start advertising."""
        if self._running:
            return
        self.link = LocalLink()  # type: ignore[no-untyped-call]
        await self.central.open_local(self.link)
        for device in self.devices:
            peripheral = LinkLevelPeripheral(
                device,
                controller_address(device),
                encrypted_uuids=self.encrypted_uuids,
                in_flight=self.in_flight,
            )
            await peripheral.power_on(self.link)
            self.peripherals[peripheral.address] = peripheral
        # Virtual time waits for the notifications the devices sent (see inflight.py).
        self.clock.add_settle_hook(self.in_flight.settle)
        super().start()  # boots the devices and runs the advertising tick
        # Advertise before returning, so a scan right away finds every device.
        self._advertise_once()
        await asyncio.gather(*(p.wait_advertising_applied() for p in self.peripherals.values()))

    async def stop(self) -> None:
        """Stop the devices, the advertising and every bumble task; raise what crashed."""
        self.clock.remove_settle_hook(self.in_flight.settle)
        try:
            await super().stop()
        finally:
            for peripheral in self.peripherals.values():
                await peripheral.close()
            await self.central.close()
        errors = self.central.callback_errors
        if errors:
            raise RuntimeError(f"{len(errors)} host notification callback(s) raised") from errors[0]

    def _add(self, device: D) -> D:
        if self._running:
            raise RuntimeError("add devices to a LinkLevelWorld before entering it")
        return super()._add(device)

    # ------------------------------------------------------------------ addresses

    def add_foreo(self, *, name: str = "", battery_percent: float | None = None) -> SimulatedForeo:
        """Refused: only OFCP firmware sits behind a virtual controller."""
        raise SimulatorError("FOREO devices are simulated on the in-process backend only")

    def _on_air_address(self, address: str) -> str:
        device = super().device_by_address(address)
        return controller_address(device) if device is not None else address

    def device_by_address(self, address: str) -> SimulatedDevice | None:
        """The device at a simulated (``SI:MU``) or on-air address."""
        peripheral = self.peripherals.get(address.upper())
        if peripheral is not None:
            return peripheral.device
        return super().device_by_address(address)

    def peripheral_of(self, device: SimulatedDevice) -> LinkLevelPeripheral:
        peripheral = self.peripherals.get(controller_address(device))
        if peripheral is None:
            raise KeyError(f"{device.serial_number} has no peripheral (is the world open?)")
        return peripheral

    async def _peer_detached(self, address: str) -> None:
        peripheral = self.peripherals.get(address.upper())
        if peripheral is not None:
            await peripheral.detached.wait()

    # ------------------------------------------------------------------ bleak backends

    @functools.cached_property
    def scanner_backend(self) -> type[LinkLevelBleakScanner]:  # type: ignore[override]
        """Pass as ``BleakScanner(backend=world.scanner_backend)``."""
        return bind_scanner(self.central)

    @functools.cached_property
    def client_backend(self) -> type[LinkLevelBleakClient]:  # type: ignore[override]
        """Pass as ``BleakClient(device, backend=world.client_backend)``."""
        return bind_client(self.central)

    def client_of(self, device: SimulatedDevice) -> LinkLevelBleakClient | None:  # type: ignore[override]
        return self.central.client_for(controller_address(device))

    # ------------------------------------------------------------------ radio

    def drop_link(self, device: SimulatedDevice, out_of_range_s: float = 0.0) -> None:  # type: ignore[override]
        """Lose the link now, as a supervision timeout does: both sides notice at once.

        Both controllers drop the connection with reason CONNECTION_TIMEOUT and
        tell their hosts (real HCI Disconnection Complete events); the host's
        disconnected callback runs before this returns, as in the in-process
        world. The device then stays out of range for ``out_of_range_s``.
        """
        super().drop_link(device, out_of_range_s)
        peripheral = self.peripherals.get(controller_address(device))
        if peripheral is None or peripheral.connection is None:
            return
        client = self.central.client_for(peripheral.address)
        if client is not None:
            client.link_lost()
        peripheral.link_lost()
        self._cut_controllers(peripheral.address)

    def _cut_controllers(self, peripheral_address: str) -> None:
        peripheral = self.peripherals[peripheral_address]
        central_controller = self.central.controller
        reason = hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR
        if central_controller is not None:
            connection = central_controller.le_connections.get(hci.Address(peripheral_address))
            if connection is not None:
                central_controller.on_le_disconnected(connection, reason)
        if peripheral.controller is not None:
            connection = peripheral.controller.le_connections.get(hci.Address(CENTRAL_ADDRESS))
            if connection is not None:
                peripheral.controller.on_le_disconnected(connection, reason)

    def disconnect_from_device(self, device: SimulatedDevice) -> None:
        """The device ends the connection (an LL_TERMINATE_IND from the peripheral)."""
        peripheral = self.peripheral_of(device)
        connection = peripheral.connection
        if connection is not None:
            peripheral.close_connection(
                connection, hci.HCI_ErrorCode.REMOTE_USER_TERMINATED_CONNECTION_ERROR
            )

    def _advertise_once(self) -> None:
        super()._advertise_once()  # draws the RSSI noise, so the random streams match
        interval_s = max(self.advertising_interval_s / self.clock.speed, MIN_ADVERTISING_INTERVAL_S)
        for peripheral in self.peripherals.values():
            peripheral.want_advertising(self.is_connectable(peripheral.device), interval_s)
