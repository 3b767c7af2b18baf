"""The fault injector of one device: its link, samples, commands, clock and events."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols import Ack, Command, Opcode, ResetReason, ResultCode, StopAll
from protocols.telemetry import MASSAGER_FLAG_CONTACT
from simulators.clock import VirtualClock
from simulators.devices.device import CommandProceed, SimulatedDevice, device_rng
from simulators.devices.link import DeviceLink
from simulators.devices.massager import CONTACT_ON_KPA
from simulators.faults.link import ActiveFault, FaultyLink
from simulators.faults.spec import (
    EVENT_FAULTS,
    EVENT_JITTER_FRACTION,
    FAULT_STREAM,
    SAMPLE_FAULTS,
    SENSOR_FIELDS,
    Fault,
    FaultKind,
    FaultRecord,
)


class DriftingClock:
    """The device's view of time: ``base`` running ``1 + ppm / 1e6`` times as fast."""

    def __init__(self, base: VirtualClock, ppm: float, anchor_s: float) -> None:
        self.base = base
        self.factor = 1.0 + ppm / 1e6
        self.anchor_s = anchor_s

    def now_s(self) -> float:
        return self.anchor_s + (self.base.now_s() - self.anchor_s) * self.factor

    def base_time_s(self, device_s: float) -> float:
        return self.anchor_s + (device_s - self.anchor_s) / self.factor

    async def sleep(self, delay_s: float) -> None:
        await self.sleep_until(self.now_s() + delay_s)

    async def sleep_until(self, t_s: float) -> None:
        await self.base.sleep_until(self.base_time_s(t_s))


class FaultInjector:
    """Faults of one device; see the module docstring.

    It works through the device's seams (:class:`~simulators.devices.device.SimulatedDevice`):
    :meth:`filter_samples` is one of its sample filters, :meth:`intercept_command` one of
    its command interceptors, :meth:`wrap_link` one of its link wrappers; a clock drift sets
    its firmware clock, and events use its public power and battery methods. Any number of
    injectors (and other users of the seams) compose on one device, in any order.

    ``world`` (optional) lets a disconnect take the device out of BLE range; without it a
    disconnect closes the link the device is attached to.
    """

    def __init__(
        self,
        device: SimulatedDevice,
        *,
        seed: int,
        clock: VirtualClock | None = None,
        world: Any = None,
        faults: Iterable[Fault] = (),
        on_record: Callable[[FaultRecord], None] | None = None,
    ) -> None:
        self.device = device
        self.seed = seed
        self.clock: VirtualClock = clock if clock is not None else device.clock
        self.world = world
        self.records: list[FaultRecord] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self._on_record = on_record
        self._faults: list[ActiveFault] = []
        self._ordinal = 0
        self._installed = False
        self._running = False
        self._saved: dict[str, Any] = {}
        self._drifting = False
        self.reboots = 0
        # What the device still held when it went down (for "no sample lost" checks).
        self.held_before_reboot: list[tuple[int, int]] = []
        for fault in faults:
            self.add(fault)

    # ------------------------------------------------------------------ the fault list

    @property
    def faults(self) -> list[Fault]:
        return [a.fault for a in self._faults]

    def add(self, fault: Fault) -> Fault:
        """Add a fault now (its schedule counts in clock time, like ``at_s``)."""
        rng = device_rng(self.seed, self.device.index, self._ordinal, FAULT_STREAM)
        active = ActiveFault(fault, rng, self._ordinal)
        self._ordinal += 1
        self._faults.append(active)
        if self._running:
            self._start_schedule(active)
        return fault

    def remove(self, fault: Fault) -> None:
        for active in list(self._faults):
            if active.fault is fault:
                self._stop_active(active)

    def clear(self, kind: FaultKind | None = None) -> int:
        """Remove every fault (of ``kind``); returns how many were removed."""
        removed = [a for a in self._faults if kind is None or a.fault.kind is kind]
        for active in removed:
            self._stop_active(active)
        return len(removed)

    def _stop_active(self, active: ActiveFault) -> None:
        if active in self._faults:
            self._faults.remove(active)
        if active.task is not None and not active.task.done():
            active.task.cancel()
        if active.fault.kind is FaultKind.MTU and "mtu_size" in self._saved:
            self.device.mtu_size = self._saved.pop("mtu_size")
        if active.fault.kind is FaultKind.CLOCK_DRIFT:
            self._restore_clock()

    @property
    def has_faults(self) -> bool:
        """Whether any fault is installed (none can act while this is ``False``)."""
        return bool(self._faults)

    def active_faults(self, t_s: float, kinds: Iterable[FaultKind]) -> list[ActiveFault]:
        if not self._faults:
            return []
        wanted = kinds if isinstance(kinds, (set, frozenset)) else set(kinds)
        return [a for a in self._faults if a.fault.kind in wanted and a.fault.active(t_s)]

    def record(self, active: ActiveFault, detail: str) -> None:
        active.hits += 1
        self.counts[active.fault.kind.value] += 1
        entry = FaultRecord(
            round(self.clock.now_s(), 6), self.device.serial_number, active.fault.kind, detail
        )
        self.records.append(entry)
        if self._on_record is not None:
            self._on_record(entry)

    # ------------------------------------------------------------------ installation

    def install(self) -> FaultInjector:
        """Put the injector on the device's seams (idempotent); before or after it starts."""
        if self._installed:
            return self
        self._installed = True
        device = self.device
        device.sample_filters.append(self.filter_samples)
        device.command_interceptors.append(self.intercept_command)
        device.add_link_wrapper(self.wrap_link)
        return self

    def uninstall(self) -> None:
        """Take the injector off the device: its faults end (what its link layer held
        back is lost)."""
        if not self._installed:
            return
        self.stop()
        for active in list(self._faults):
            self._stop_active(active)
        device = self.device
        device.sample_filters.remove(self.filter_samples)
        device.command_interceptors.remove(self.intercept_command)
        device.remove_link_wrapper(self.wrap_link)
        self._installed = False

    def wrap_link(self, link: DeviceLink) -> FaultyLink:
        """The device's link wrapper: message faults on every link it attaches."""
        return FaultyLink(link, self)

    def start(self) -> None:
        """Start the scheduled events (a running event loop is needed)."""
        self.install()
        if self._running:
            return
        self._running = True
        for active in self._faults:
            self._start_schedule(active)

    def stop(self) -> None:
        self._running = False
        for active in self._faults:
            if active.task is not None and not active.task.done():
                active.task.cancel()
            active.task = None

    def _start_schedule(self, active: ActiveFault) -> None:
        kind = active.fault.kind
        if kind in EVENT_FAULTS or kind in (FaultKind.MTU, FaultKind.CLOCK_DRIFT):
            active.task = asyncio.get_running_loop().create_task(
                self._schedule(active), name=f"fault {kind.value} {self.device.serial_number}"
            )

    async def _schedule(self, active: ActiveFault) -> None:
        fault = active.fault
        clock = self.clock
        await clock.sleep_until(fault.at_s)
        if fault.kind in (FaultKind.MTU, FaultKind.CLOCK_DRIFT):
            self._begin_state(active)
            if fault.duration_s is not None:
                await clock.sleep_until(fault.end_s)
                self._stop_active(active)
            return
        done = 0
        nominal_s = fault.at_s
        while True:
            await self._event(active)
            done += 1
            if fault.every_s is None or (fault.count is not None and done >= fault.count):
                return
            nominal_s += fault.every_s
            jitter_s = float(active.rng.uniform(-1.0, 1.0)) * EVENT_JITTER_FRACTION * fault.every_s
            next_s = max(clock.now_s(), nominal_s + jitter_s)
            if next_s >= fault.end_s:
                return
            await clock.sleep_until(next_s)

    def _begin_state(self, active: ActiveFault) -> None:
        fault = active.fault
        device = self.device
        if fault.kind is FaultKind.MTU:
            self._saved.setdefault("mtu_size", device.mtu_size)
            device.mtu_size = int(fault.param("mtu_size"))
            self.record(active, f"MTU now {device.mtu_size}")
        elif fault.kind is FaultKind.CLOCK_DRIFT:
            device.catch_up()  # samples due so far were taken on the true clock
            drifting = DriftingClock(self.clock, float(fault.param("ppm")), self.clock.now_s())
            device.set_firmware_clock(drifting)
            self._drifting = True
            self.record(active, f"device clock off by {float(fault.param('ppm')):g} ppm")

    def _restore_clock(self) -> None:
        if self._drifting:
            self.device.set_firmware_clock(None)
            self._drifting = False

    # ------------------------------------------------------------------ events

    async def _event(self, active: ActiveFault) -> None:
        kind = active.fault.kind
        device = self.device
        if kind is FaultKind.DISCONNECT:
            out_of_range_s = float(active.fault.param("out_of_range_s"))
            if not device.is_connected:
                return
            self.record(active, f"link dropped, out of range for {out_of_range_s:g} s")
            if self.world is not None and hasattr(self.world, "drop_link"):
                self.world.drop_link(device, out_of_range_s=out_of_range_s)
            else:
                link = device.link
                device.detach_link()
                if link is not None:
                    link.device_closed()
        elif kind in (FaultKind.REBOOT, FaultKind.BROWNOUT):
            await self._reboot(active, graceful=kind is FaultKind.REBOOT)
        elif kind is FaultKind.LOW_BATTERY:
            await self._low_battery(active)

    async def _reboot(self, active: ActiveFault, *, graceful: bool) -> None:
        device = self.device
        if not device.is_powered:
            return
        device.catch_up()
        if graceful:
            # A firmware-initiated restart sends what it holds before it goes.
            device.send_pending()
        self.held_before_reboot.append((device.ring.oldest_sequence, device.ring.next_sequence))
        self.record(
            active,
            f"{'reboot' if graceful else 'brown-out'} at sample {device.ring.next_sequence}",
        )
        # The power (or the firmware) is gone: no SHUTDOWN event, no goodbye. A warm reset
        # keeps the sample count in retained RAM for the next BOOT; a brown-out does not.
        device.lose_power(keeps_count=graceful)
        await device.stop()
        self.reboots += 1
        await self.clock.sleep(float(active.fault.param("down_s")))
        # RAM is lost: actuators off, then boot (sequence numbers start again at 0).
        device.execute(Command.of(0, StopAll()))
        self._restore_clock()
        device.start(ResetReason.SOFTWARE if graceful else ResetReason.BROWN_OUT)

    async def _low_battery(self, active: ActiveFault) -> None:
        device = self.device
        if not device.is_powered:
            return
        device.catch_up()
        device.drop_battery_charge(float(active.fault.param("percent")))
        self.record(active, f"battery at {device.battery_percent} %")
        empty_after_s = active.fault.param("empty_after_s")
        if empty_after_s is None:
            return
        await self.clock.sleep(float(empty_after_s))
        if not _powered(device):
            return
        device.catch_up()
        device.send_pending()  # what the firmware holds goes out before the battery gives up
        device.drop_battery_charge(0.0, report_now=False)
        self.record(active, "battery empty: shutting down")
        # The next sample finds the battery empty and the firmware shuts down (SHUTDOWN).
        await self.clock.sleep(1.0 / device.sample_rate_hz)
        device.catch_up()

    # ------------------------------------------------------------------ commands and sensors

    def intercept_command(self, command: Command, proceed: CommandProceed) -> Ack | None:
        """The device's command interceptor: ``ignore_commands`` acknowledges the listed
        opcodes without applying them."""
        now_s = self.clock.now_s()
        for active in self.active_faults(now_s, {FaultKind.IGNORE_COMMANDS}):
            names = active.fault.param("opcodes")
            if isinstance(command.opcode, Opcode) and command.opcode.name in names:
                self.record(active, f"{command.opcode.name} acknowledged but not applied")
                return Ack(command.command_id, command.opcode, ResultCode.OK)
        return proceed(command)

    def filter_samples(
        self, times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]
    ) -> npt.NDArray[np.void]:
        """The device's sample filter: the sensor faults active at each sample's time."""
        if not self._faults:
            return samples
        count = int(samples.shape[0])
        distorting = [a for a in self._faults if a.fault.kind in SAMPLE_FAULTS]
        if count == 0 or not distorting:
            return samples
        device = self.device
        boot_s = self.clock.now_s() - device.uptime_s
        clock_times = times_s[:count] + boot_s
        for active in distorting:
            fault = active.fault
            mask = (clock_times >= fault.at_s) & (clock_times < fault.end_s)
            if not mask.any():
                continue
            column, unit = SENSOR_FIELDS[str(fault.param("field"))]
            if column not in samples.dtype.names:  # type: ignore[operator]
                continue
            samples = self._distort(active, samples, column, unit, mask, clock_times)
        return samples

    def _distort(
        self,
        active: ActiveFault,
        samples: npt.NDArray[np.void],
        column: str,
        unit: float,
        mask: npt.NDArray[np.bool_],
        clock_times: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.void]:
        fault = active.fault
        info = np.iinfo(samples.dtype[column])
        raw = samples[column].astype(np.float64)
        kind = fault.kind
        first_hit = active.hits == 0
        if kind is FaultKind.STUCK_SENSOR:
            if active.stuck_raw is None:
                value = fault.param("value")
                index = int(np.argmax(mask))
                active.stuck_raw = (
                    round(float(value) / unit) if value is not None else int(raw[index])
                )
            raw = np.where(mask, active.stuck_raw, raw)
            if column == "pressure_dapa" and "flags" in samples.dtype.names:  # type: ignore[operator]
                contact = active.stuck_raw * unit >= CONTACT_ON_KPA
                flags = samples["flags"]
                stuck_flags = (
                    (flags | MASSAGER_FLAG_CONTACT)
                    if contact
                    else (flags & ~np.uint8(MASSAGER_FLAG_CONTACT))
                )
                samples["flags"] = np.where(mask, stuck_flags, flags)
            detail = f"{column} stuck at raw {active.stuck_raw}"
        elif kind is FaultKind.NOISE:
            noise = active.rng.standard_normal(raw.shape[0]) * float(fault.param("sigma")) / unit
            raw = np.where(mask, raw + noise, raw)
            detail = f"{column} noise sigma {fault.param('sigma')}"
        elif kind is FaultKind.DRIFT:
            offset = (clock_times - fault.at_s) * float(fault.param("per_s")) / unit
            raw = np.where(mask, raw + offset, raw)
            detail = f"{column} drifting {fault.param('per_s')} per s"
        elif kind is FaultKind.SATURATION:
            top = float(fault.param("max")) / unit
            raw = np.where(mask, np.minimum(raw, top), raw)
            detail = f"{column} saturates at {fault.param('max')}"
        else:  # DROPOUT: per block of samples, the sensor answers 0 (an I2C read that failed)
            if active.rng.random() >= float(fault.param("rate")):
                return samples
            raw = np.where(mask, 0.0, raw)
            if column == "pressure_dapa" and "flags" in samples.dtype.names:  # type: ignore[operator]
                samples["flags"] = np.where(
                    mask, samples["flags"] & ~np.uint8(MASSAGER_FLAG_CONTACT), samples["flags"]
                )
            detail = f"{column} dropped out"
        samples[column] = np.clip(np.round(raw), info.min, info.max)
        if first_hit:
            self.record(active, detail)
        else:
            active.hits += 1
        return samples


def _powered(device: SimulatedDevice) -> bool:
    # A function, not the property, so type checkers do not keep a narrowing across awaits.
    return device.is_powered


def inject(
    device: SimulatedDevice,
    faults: Iterable[Fault],
    *,
    seed: int | None = None,
    world: Any = None,
    on_record: Callable[[FaultRecord], None] | None = None,
) -> FaultInjector:
    """Install faults on ``device`` and start their schedule (inside a running loop)."""
    injector = FaultInjector(
        device,
        seed=device.seed if seed is None else seed,
        world=world,
        faults=faults,
        on_record=on_record,
    )
    injector.start()
    return injector
