"""The composition root: wires real parts together for one CLI command.

This is the only host module that imports :mod:`simulators` (for ``--simulate``
and the demo). Everything else receives its clock, bleak backends and
transports from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

from devicebridge.clock import Clock, SystemClock
from devicebridge.config import Settings, data_dir
from devicebridge.core.catalogue import (
    FOREO_DRIVER,
    OFCP_DRIVER,
    load_catalogue,
)
from devicebridge.core.engine import (
    Decision,
)
from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.routine import MassageStep, Routine, parse_routine
from devicebridge.device.monitor import DeviceSnapshot, TelemetryMonitor
from devicebridge.device.session import (
    DeviceSession,
    MaskSession,
    MassagerSession,
    session_class_for,
)
from devicebridge.device.transport.base import DeviceInfo, Transport
from devicebridge.device.transport.ble import (
    BleBackends,
    BleTransport,
    DiscoveredDevice,
    find_device,
    kind_label,
    matches,
    scan,
)
from devicebridge.device.transport.foreo import ForeoTransport
from devicebridge.device.transport.serial import SerialTransport
from devicebridge.errors import DeviceBridgeError, DeviceNotFoundError
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.run.summary import RunSummary
from devicebridge.run.view import RunnerState
from devicebridge.storage.registry import DeviceRegistry, PairedDevice
from protocols import DeviceKind, MassageMode, Zone
from protocols.constants import zone_named

if TYPE_CHECKING:
    from simulators import HandScript, SimulatedWorld
    from simulators.smp import FirmwareStateStore

_LOGGER = logging.getLogger(__name__)

# Under the data directory: the simulated devices' flash, one file per serial number.
SIMULATED_FIRMWARE_DIR: Final = "simulated-devices"
DEMO_SCAN_S: Final = 1.0
DEMO_REFRESH_S: Final = 0.25
DEMO_INTENSITY: Final = 5
DEMO_LED_RED_MW_CM2: Final = 30.0  # within the typical consumer range (domain-safety.md)
DEMO_LED_NIR_MW_CM2: Final = 20.0
DEMO_LED_FRACTION: Final = 0.6  # of the demo duration
DEMO_ZONES: Final = (Zone.CHEEK_LEFT, Zone.FOREHEAD)
# The event loop answers every device's over-cap sample with STOP_ALL, while another
# thread of the process may run Python (a QA scenario's, the clinic's; the store's writer
# was one, before it became a process). CPython lets a thread keep the GIL for the switch
# interval (5 ms by default) before one that waits gets it, so a safety stop could wait
# that long; a command runs with this bound instead (measured with ``python -m bench
# latency`` and the writer's thread of the time: the bridge's read -> STOP p99 at 100
# devices went from about 2.2 ms to 0.9 ms).
THREAD_SWITCH_INTERVAL_S: Final = 0.0005
# Once a long-running command has started (freeze_start_up), the collector's youngest
# generation is collected every this many new containers instead of every 700: what a
# routine's commands and records make for a few milliseconds then dies before the
# collector sees it, instead of moving to the older generations, whose passes held the
# event loop for 3-6 ms each (``python -m bench latency``, 100 devices, 2 cores: one
# pass of the older generations in an 8-s run instead of five). On that noisy machine the
# runner's p99 read 1.6-9.3 ms, median 2.6, in nineteen runs, against 1.5-5.3 ms, median
# 2.9, in nineteen at 700: fewer long pauses, a gain smaller than the machine's noise.
YOUNG_COLLECTION_CONTAINERS: Final = 5000


@contextlib.contextmanager
def event_loop_first() -> Iterator[None]:
    """Within it, a thread waiting for the GIL waits at most THREAD_SWITCH_INTERVAL_S, and
    what :func:`freeze_start_up` froze and set is given back to the collector at the end."""
    before = sys.getswitchinterval()
    frozen_before = gc.get_freeze_count()
    thresholds_before = gc.get_threshold()
    sys.setswitchinterval(min(before, THREAD_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
        gc.set_threshold(*thresholds_before)
        if frozen_before == 0:
            gc.unfreeze()


def freeze_start_up() -> None:
    """Leave what start-up made (modules, the policy, sessions, workers) out of the garbage
    collector's full passes from now on: it lives as long as the command, and scanning it
    all held the event loop for 10-20 ms at a time (``python -m bench latency``); and
    collect the youngest generation less often (:data:`YOUNG_COLLECTION_CONTAINERS`).
    Called once a long-running command has started; :func:`event_loop_first` undoes it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_CONTAINERS, *gc.get_threshold()[1:])


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
        self._firmware_store: FirmwareStateStore | None = None
        self.clock: Clock = SystemClock()
        self._scope = contextlib.ExitStack()  # what __aenter__ set up for the command
        self.ble_backends = BleBackends()
        self.rng = random.Random(options.sim_seed if options.simulate else None)
        # Validated at start-up: a malformed family file stops every command, as a
        # malformed configuration does.
        self.catalogue = load_catalogue(options.settings.device_catalogue_dir)

    async def __aenter__(self) -> App:
        self._scope.enter_context(event_loop_first())
        if self.options.simulate:
            await self._start_world()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stop_world()
        finally:
            self._scope.close()

    # ------------------------------------------------------------------ simulation

    async def _start_world(self) -> None:
        from simulators import SimulatedWorld, VirtualClock
        from simulators.smp import FirmwareStateStore

        clock = VirtualClock(realtime=not self.options.sim_fast)
        world = SimulatedWorld(seed=self.options.sim_seed, clock=clock)
        for _ in range(self.settings.sim_massagers):
            world.add_massager()
        for _ in range(self.settings.sim_masks):
            world.add_mask()
        for _ in range(self.settings.sim_foreo):
            world.add_foreo()
        # A simulated device keeps its firmware (slots, a partial upload) between
        # commands, as a real one does: docs/firmware.md.
        self._firmware_store = FirmwareStateStore(self.data_dir / SIMULATED_FIRMWARE_DIR)
        for device in world.devices:
            self._firmware_store.load(device, world.smp_firmware(device))
        await world.__aenter__()
        clock.start()
        self._world, self._sim_clock = world, clock
        self.clock = clock
        self.ble_backends = BleBackends(world.scanner_backend, world.client_backend)

    async def _stop_world(self) -> None:
        from simulators import SimulatedWorld, VirtualClock

        world, clock = self._world, self._sim_clock
        self._world = self._sim_clock = None
        try:
            if isinstance(world, SimulatedWorld):
                await world.__aexit__(None, None, None)
        finally:
            if isinstance(clock, VirtualClock):
                await clock.stop()
            store = self._firmware_store
            if isinstance(world, SimulatedWorld) and store is not None:
                for device in world.devices:
                    store.save(device, world.smp_firmware(device))

    # ------------------------------------------------------------------ parts

    def open_registry(self) -> DeviceRegistry:
        return DeviceRegistry.in_data_dir(self.data_dir)

    async def scan(self, duration_s: float) -> list[DiscoveredDevice]:
        return await scan(self.clock, duration_s, self.ble_backends.scanner, self.catalogue)

    async def find(self, identifier: str, timeout_s: float) -> DiscoveredDevice:
        """The device ``identifier`` names; not found, the error lists what was in range."""
        seen: dict[str, DiscoveredDevice] = {}

        def wanted(device: DiscoveredDevice) -> bool:
            seen[device.address] = device
            return matches(device, identifier)

        try:
            return await find_device(
                self.clock,
                wanted,
                timeout_s,
                self.ble_backends.scanner,
                description=identifier,
                catalogue=self.catalogue,
            )
        except DeviceNotFoundError:
            in_range = ", ".join(
                f"{d.name} ({d.serial_number or d.address})"
                for d in sorted(seen.values(), key=lambda d: d.name)
            )
            raise DeviceNotFoundError(
                identifier, timeout_s=timeout_s, where=f"in range: {in_range or 'none'}"
            ) from None

    def ble_transport(self, device: DiscoveredDevice) -> Transport:
        """The driver of a scanned device's family."""
        family = device.match.family if device.match is not None else None
        if family is not None and family.driver == FOREO_DRIVER:
            return ForeoTransport(self.clock, family, device=device, backends=self.ble_backends)
        return BleTransport(self.clock, device=device, backends=self.ble_backends)

    def serial_transport(self, port: str) -> SerialTransport:
        # A serial device runs on its own time (hardware, or a simulator in
        # another process), so waits on it use the wall clock.
        return SerialTransport(port, SystemClock())

    def transport_for(self, paired: PairedDevice, serial_port: str | None = None) -> Transport:
        """The driver of a paired device, by its catalogue family."""
        family = self.catalogue.family(paired.family)
        if family is None:
            raise DeviceNotFoundError(
                paired.name,
                where=f"its family {paired.family!r} is not in the device catalogue",
            )
        if family.driver == FOREO_DRIVER:
            if paired.last_address is None:
                raise DeviceNotFoundError(paired.name, where="no address recorded: pair it again")
            return ForeoTransport(
                self.clock,
                family,
                address=paired.last_address,
                backends=self.ble_backends,
                find_timeout_s=self.settings.scan_timeout_s,
            )
        assert family.driver == OFCP_DRIVER
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

    def script_simulated_hand(
        self, serial_number: str, routine: Routine, policy: SafetyPolicy, *, lead_in_s: float
    ) -> bool:
        """With ``--simulate``: the simulated massager's hand follows ``routine`` from now on."""
        from simulators import SimulatedMassager, SimulatedWorld

        world = self._world
        if not isinstance(world, SimulatedWorld):
            return False
        for device in world.devices:
            if isinstance(device, SimulatedMassager) and device.serial_number == serial_number:
                start_s = device.uptime_s + lead_in_s
                device.hand = routine_hand_script(routine, policy, start_s=start_s)
                return True
        return False


# --------------------------------------------------------------------------- simulated hands

HAND_STROKE_S: Final = 10.0  # longest stroke before the hand lifts briefly
HAND_LIFT_S: Final = 0.5  # between strokes (well below the no-contact pause)
HAND_MOVE_S: Final = 1.5  # from one zone to the next
HAND_SAMPLE_HZ: Final = 100  # the simulated massager's rate: strokes start between samples
HAND_EDGE_S: Final = 1e-6


def routine_hand_script(
    routine: Routine,
    policy: SafetyPolicy,
    *,
    start_s: float,
    events: Sequence[tuple[int, float, float]] = (),
) -> HandScript:
    """A simulated hand that follows ``routine`` from ``start_s`` (seconds since boot).

    Each step's zone gets exactly the step's contact time, in strokes at the middle of the
    step's pressure band, so a correct host completes the routine. ``events`` adds scripted
    mistakes as ``(step number, offset_s, pressure_kpa)``: one second at that pressure,
    ``offset_s`` into the step (a press too light or too hard, for demos). Time above the
    zone's cap does not count as contact time, so the hand makes it up.
    """
    from simulators import HandScript, HandSegment

    hz = HAND_SAMPLE_HZ
    stroke_ticks = round(HAND_STROKE_S * hz)
    by_step = {step: (offset_s, kpa) for step, offset_s, kpa in events}
    segments: list[HandSegment] = []
    # Whole samples plus half a sample: no sample ever sits on a stroke boundary.
    t_ticks = math.ceil(start_s * hz)
    steps = [s for s in routine.steps if isinstance(s, MassageStep)]
    for number, step in enumerate(steps, start=1):
        zone = zone_named(step.zone)
        middle_kpa = (step.pressure_min_kpa + step.pressure_max_kpa) / 2
        contact_ticks = round(step.contact_time_s * hz)
        pieces = [(contact_ticks, middle_kpa)]
        if number in by_step:
            offset_s, kpa = by_step[number]
            before = min(contact_ticks, round(offset_s * hz))
            counted = 0 if kpa > policy.zones[step.policy_zone].cap_kpa.value else hz
            after = max(0, contact_ticks - before - counted)
            pieces = [(before, middle_kpa), (hz, kpa), (after, middle_kpa)]
        on_skin = 0  # ticks since the hand last lifted
        for ticks, kpa in pieces:
            while ticks > 0:
                if on_skin == stroke_ticks:
                    t_ticks += round(HAND_LIFT_S * hz)
                    on_skin = 0
                chunk = min(ticks, stroke_ticks - on_skin)
                # A hair short, so float rounding never makes neighbours overlap.
                duration_s = chunk / hz - HAND_EDGE_S
                segments.append(HandSegment((t_ticks + 0.5) / hz, duration_s, zone, kpa))
                t_ticks += chunk
                on_skin += chunk
                ticks -= chunk
        t_ticks += round(HAND_MOVE_S * hz)
    return HandScript(segments)


# --------------------------------------------------------------------------- demo


@dataclass(frozen=True, slots=True)
class DemoResult:
    snapshots: list[DeviceSnapshot]
    sequences_ok: bool
    routines: list[RunSummary] = field(default_factory=list)


# The demo routines: short, so that they show guidance, a warning and a safety stop within
# the demo's duration. The hand of the first massager presses too lightly on the cheek,
# then too hard on the forehead (above its cap: the motor stops, then resumes).
DEMO_STEP_FRACTION: Final = 0.25  # of the demo duration per massage step
DEMO_MIN_STEP_S: Final = 2
DEMO_HAND_LEAD_IN_S: Final = 0.3
DEMO_TOO_LIGHT_KPA: Final = 1.5
DEMO_TOO_HARD_KPA: Final = 17.0  # above the 15 kPa forehead cap of the default policy
DEMO_MISTAKE_AFTER_S: Final = 0.5


def demo_routines(duration_s: float) -> tuple[str, str]:
    """(massage routine, LED routine) as TOML, scaled to the demo's duration."""
    step_s = max(DEMO_MIN_STEP_S, round(duration_s * DEMO_STEP_FRACTION))
    led_s = max(1, round(duration_s * DEMO_LED_FRACTION))
    header = 'author = "devicebridge demo"\nversion = "1"\ncategory = "demo"\n'
    massage = f'[routine]\nname = "Demo massage"\n{header}device_kind = "massager"\n' + "".join(
        f'\n[[steps]]\nzone = "{zone}"\ncontact_time_s = {step_s}\nmode = "vibration"\n'
        f"intensity = {DEMO_INTENSITY}\npressure_kpa = {{ min = 4.0, max = 12.0 }}\n"
        f'guidance = "{text}"\n'
        for zone, text in (
            ("cheek_left", "Upward strokes on the left cheek."),
            ("forehead", "Strokes from the brow up to the hairline."),
        )
    )
    led = (
        f'[routine]\nname = "Demo light"\n{header}device_kind = "led_mask"\n'
        f"\n[[steps]]\nred_mw_cm2 = {DEMO_LED_RED_MW_CM2}\n"
        f"near_infrared_mw_cm2 = {DEMO_LED_NIR_MW_CM2}\nduration_s = {led_s}\n"
        'guidance = "Close your eyes; keep the eye shields in place."\n'
    )
    return massage, led


async def run_demo(
    *,
    seed: int,
    duration_s: float,
    fast: bool,
    massagers: int = 2,
    masks: int = 1,
    on_update: Callable[[float, Sequence[DeviceSnapshot]], None] | None = None,
    refresh_s: float = DEMO_REFRESH_S,
    on_routine_state: Callable[[RunnerState], None] | None = None,
    on_routine_decision: Callable[[str, Decision], None] | None = None,
) -> DemoResult:
    """Simulated devices in-process, found and driven through the real bleak API.

    The first massager and the first mask run a short routine under the default policy
    (guidance, pressure warnings, a safety stop); the other devices only stream.
    """
    from simulators import SimulatedWorld, VirtualClock

    policy = default_policy()
    massage_text, led_text = demo_routines(duration_s)
    routines = {
        DeviceKind.MASSAGER: parse_routine(massage_text, policy, label="demo massage"),
        DeviceKind.LED_MASK: parse_routine(led_text, policy, label="demo light"),
    }
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
            runners: list[RoutineRunner] = []
            for index, session in enumerate(sessions):
                routine = routines.get(DeviceKind(session.device_info.kind))
                if routine is None or any(r.routine is routine for r in runners):
                    await _start_demo_routine(session, index, duration_s)
                    continue
                _script_demo_hand(world, session.device_info.serial_number, routine, policy)
                runners.append(
                    RoutineRunner(
                        session,
                        routine,
                        policy,
                        mode=RunMode.HOST,
                        on_update=on_routine_state,
                        on_decision=_bound(on_routine_decision, session.name),
                    )
                )
            start_s = clock.now_s()
            end_s = start_s + duration_s
            routine_tasks = [
                asyncio.ensure_future(runner.run(max_duration_s=duration_s)) for runner in runners
            ]
            while clock.now_s() < end_s:
                await clock.sleep(min(refresh_s, end_s - clock.now_s()))
                if on_update is not None:
                    on_update(clock.now_s() - start_s, [m.snapshot() for m in monitors])
            summaries = list(await asyncio.gather(*routine_tasks))
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
    return DemoResult(
        [m.snapshot() for m in monitors], all(m.sequences_ok for m in monitors), summaries
    )


def _bound(
    callback: Callable[[str, Decision], None] | None, name: str
) -> Callable[[Decision], None] | None:
    if callback is None:
        return None
    return lambda decision: callback(name, decision)


def _script_demo_hand(
    world: SimulatedWorld, serial_number: str, routine: Routine, policy: SafetyPolicy
) -> None:
    from simulators import SimulatedMassager

    for device in world.devices:
        if isinstance(device, SimulatedMassager) and device.serial_number == serial_number:
            device.hand = routine_hand_script(
                routine,
                policy,
                start_s=device.uptime_s + DEMO_HAND_LEAD_IN_S,
                events=[
                    (1, DEMO_MISTAKE_AFTER_S, DEMO_TOO_LIGHT_KPA),
                    (2, DEMO_MISTAKE_AFTER_S, DEMO_TOO_HARD_KPA),
                ],
            )


async def _start_demo_routine(session: DeviceSession, index: int, duration_s: float) -> None:
    if isinstance(session, MassagerSession):
        await session.set_mode(MassageMode.VIBRATION)
        await session.set_intensity(DEMO_INTENSITY)
        await session.set_zone(DEMO_ZONES[index % len(DEMO_ZONES)])
    elif isinstance(session, MaskSession):
        led_s = max(1, round(duration_s * DEMO_LED_FRACTION))
        await session.start_led(DEMO_LED_RED_MW_CM2, DEMO_LED_NIR_MW_CM2, 0.0, led_s)
