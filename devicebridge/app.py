"""The composition root: wires real parts together for one CLI command.

This is the only host module that imports :mod:`simulators` (for ``--simulate``
and the demo). Everything else receives its clock, bleak backends and
transports from here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from devicebridge.clock import Clock, SystemClock
from devicebridge.config import Settings, data_dir
from devicebridge.errors import DeviceBridgeError, DeviceNotFoundError
from devicebridge.monitor import DeviceSnapshot, TelemetryMonitor
from devicebridge.session import DeviceSession, MaskSession, MassagerSession, session_class_for
from devicebridge.storage.registry import DeviceRegistry, PairedDevice
from devicebridge.transport.base import DeviceInfo, Transport
from devicebridge.transport.ble import (
    BleBackends,
    BleTransport,
    DiscoveredDevice,
    find_device,
    kind_label,
    matches,
    scan,
)
from devicebridge.transport.serial import SerialTransport
from protocols import MassageMode, Zone

_LOGGER = logging.getLogger(__name__)

DEMO_SCAN_S: Final = 1.0
DEMO_REFRESH_S: Final = 0.25
DEMO_INTENSITY: Final = 5
DEMO_LED_RED_MW_CM2: Final = 30.0  # within the typical consumer range (domain-safety.md)
DEMO_LED_NIR_MW_CM2: Final = 20.0
DEMO_LED_FRACTION: Final = 0.6  # of the demo duration
DEMO_ZONES: Final = (Zone.CHEEK_LEFT, Zone.FOREHEAD)


@dataclass(frozen=True, slots=True)
class AppOptions:
    settings: Settings
    simulate: bool
    sim_seed: int
    data_dir: Path | None = None
    sim_fast: bool = False  # the simulated world runs as fast as the CPU allows


class App:
    """One run of a command: the clock, the BLE backends, the registry, maybe a simulated world."""

    def __init__(self, options: AppOptions) -> None:
        self.options = options
        self.settings = options.settings
        self.data_dir = data_dir(options.data_dir, options.settings)
        self._world: object | None = None
        self._sim_clock: object | None = None
        self.clock: Clock = SystemClock()
        self.ble_backends = BleBackends()
        self.rng = random.Random(options.sim_seed if options.simulate else None)

    async def __aenter__(self) -> App:
        if self.options.simulate:
            await self._start_world()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_world()

    # ------------------------------------------------------------------ simulation

    async def _start_world(self) -> None:
        from simulators import SimulatedWorld, VirtualClock

        clock = VirtualClock(realtime=not self.options.sim_fast)
        world = SimulatedWorld(seed=self.options.sim_seed, clock=clock)
        for _ in range(self.settings.sim_massagers):
            world.add_massager()
        for _ in range(self.settings.sim_masks):
            world.add_mask()
        await world.__aenter__()
        clock.start()
        self._world, self._sim_clock = world, clock
        self.clock = clock
        self.ble_backends = BleBackends(world.scanner_backend, world.client_backend)

    async def _stop_world(self) -> None:
        from simulators import SimulatedWorld, VirtualClock

        world, clock = self._world, self._sim_clock
        self._world = self._sim_clock = None
        if isinstance(world, SimulatedWorld):
            await world.__aexit__(None, None, None)
        if isinstance(clock, VirtualClock):
            await clock.stop()

    # ------------------------------------------------------------------ parts

    def open_registry(self) -> DeviceRegistry:
        return DeviceRegistry.in_data_dir(self.data_dir)

    async def scan(self, duration_s: float) -> list[DiscoveredDevice]:
        return await scan(self.clock, duration_s, self.ble_backends.scanner)

    async def find(self, identifier: str, timeout_s: float) -> DiscoveredDevice:
        return await find_device(
            self.clock,
            lambda device: matches(device, identifier),
            timeout_s,
            self.ble_backends.scanner,
            description=identifier,
        )

    def ble_transport(self, device: DiscoveredDevice) -> BleTransport:
        return BleTransport(self.clock, device=device, backends=self.ble_backends)

    def serial_transport(self, port: str) -> SerialTransport:
        # A serial device runs on its own time (hardware, or a simulator in
        # another process), so waits on it use the wall clock.
        return SerialTransport(port, SystemClock())

    def transport_for(self, paired: PairedDevice, serial_port: str | None = None) -> Transport:
        if serial_port is not None or paired.transport == "serial":
            port = serial_port or paired.serial_port
            if port is None:
                raise DeviceNotFoundError(paired.name, where="no serial port recorded")
            return self.serial_transport(port)
        return BleTransport(
            self.clock,
            serial_number=paired.serial_number,
            address=paired.last_address,
            backends=self.ble_backends,
            find_timeout_s=self.settings.scan_timeout_s,
        )

    def session(
        self,
        transport: Transport,
        kind: str | None = None,
        *,
        name: str | None = None,
        stream_telemetry: bool = True,
    ) -> DeviceSession:
        cls = {"massager": MassagerSession, "led_mask": MaskSession}.get(kind or "", DeviceSession)
        clock = transport.clock if isinstance(transport, SerialTransport) else self.clock
        return cls(
            transport,
            clock,
            rng=random.Random(self.rng.random()),
            command_timeout_s=self.settings.command_timeout_s,
            find_timeout_s=self.settings.scan_timeout_s,
            stream_telemetry=stream_telemetry,
            name=name,
        )

    async def read_info(self, transport: Transport) -> DeviceInfo:
        """Connect just long enough to read what the device is."""
        session = self.session(transport, stream_telemetry=False)
        async with session:
            return session.device_info

    async def sleep(self, duration_s: float) -> None:
        await self.clock.sleep(duration_s)


# --------------------------------------------------------------------------- demo


@dataclass(frozen=True, slots=True)
class DemoResult:
    snapshots: list[DeviceSnapshot]
    sequences_ok: bool


async def run_demo(
    *,
    seed: int,
    duration_s: float,
    fast: bool,
    massagers: int = 2,
    masks: int = 1,
    on_update: Callable[[float, Sequence[DeviceSnapshot]], None] | None = None,
    refresh_s: float = DEMO_REFRESH_S,
) -> DemoResult:
    """Simulated devices in-process, found and driven through the real bleak API."""
    from simulators import SimulatedWorld, VirtualClock

    clock = VirtualClock(realtime=not fast)
    world = SimulatedWorld(seed=seed, clock=clock)
    for _ in range(massagers):
        world.add_massager()
    for _ in range(masks):
        world.add_mask()
    backends = BleBackends(world.scanner_backend, world.client_backend)
    rng = random.Random(seed)
    sessions: list[DeviceSession] = []
    monitors: list[TelemetryMonitor] = []
    async with world:
        clock.start()
        try:
            found = await scan(clock, DEMO_SCAN_S, backends.scanner)
            if len(found) < massagers + masks:
                raise DeviceNotFoundError(
                    f"{massagers + masks} simulated devices",
                    timeout_s=DEMO_SCAN_S,
                    where=f"only {len(found)} seen",
                )
            for device in found:
                cls = session_class_for(device.kind)
                session = cls(
                    BleTransport(clock, device=device, backends=backends),
                    clock,
                    rng=random.Random(rng.random()),
                    name=device.name,
                )
                monitor = TelemetryMonitor(session, device.name, kind_label(device.kind))
                monitor.start()
                sessions.append(session)
                monitors.append(monitor)
            # Connect to all of them at once.
            await asyncio.gather(*(session.start() for session in sessions))
            await asyncio.gather(
                *(_start_demo_routine(s, i, duration_s) for i, s in enumerate(sessions))
            )
            start_s = clock.now_s()
            end_s = start_s + duration_s
            while clock.now_s() < end_s:
                await clock.sleep(min(refresh_s, end_s - clock.now_s()))
                if on_update is not None:
                    on_update(clock.now_s() - start_s, [m.snapshot() for m in monitors])
            for session in sessions:
                try:
                    await session.stop_all()
                except DeviceBridgeError as exc:
                    _LOGGER.warning("%s: stop_all: %s", session.name, exc)
        finally:
            for session in sessions:
                await session.close()
            for monitor in monitors:
                await monitor.stop()
            await clock.stop()
    return DemoResult([m.snapshot() for m in monitors], all(m.sequences_ok for m in monitors))


async def _start_demo_routine(session: DeviceSession, index: int, duration_s: float) -> None:
    if isinstance(session, MassagerSession):
        await session.set_mode(MassageMode.VIBRATION)
        await session.set_intensity(DEMO_INTENSITY)
        await session.set_zone(DEMO_ZONES[index % len(DEMO_ZONES)])
    elif isinstance(session, MaskSession):
        led_s = max(1, round(duration_s * DEMO_LED_FRACTION))
        await session.start_led(DEMO_LED_RED_MW_CM2, DEMO_LED_NIR_MW_CM2, 0.0, led_s)
