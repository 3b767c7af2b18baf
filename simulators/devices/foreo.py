"""A simulated FOREO device, written from the only public description of one.

That description is Buttplug's device configuration (``protocols/foreo.py`` names the
files): the device advertises one of the names listed there, offers service ``0xFFF0`` with
characteristic ``0xFFF1``, to which a host writes, with response, ``[0x01, mode, speed]``
(speed 0-10), and, as most BLE devices do, the standard Battery Service. It reports nothing
else: no pressure, contact or temperature, no acknowledgement beyond the write's own.

What the description does not say, this model decides in the way that is hardest on a host,
and says so:

- it keeps vibrating at the last speed when the link drops, until a host writes speed 0 or
  it powers off (a host must not count on the device stopping by itself);
- it has no automatic shut-off;
- a packet it cannot read (wrong length, type or speed) changes nothing and is counted in
  :attr:`SimulatedForeo.malformed_writes`.

Its firmware loop runs every ``TICK_S`` of virtual time (the battery drains with the motor
and the Battery Level is notified when its percent changes), like the OFCP models' sampling
loop, so virtual time moves in small steps around it too.

Real devices may differ in any of these; ``docs/devices.md`` says how to report one that
does. Every write is kept in :attr:`SimulatedForeo.writes` with its virtual time, so a test
can check the exact bytes a host sent, and every speed change in :attr:`speed_log`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from protocols.errors import ProtocolError
from protocols.foreo import VibratePacket
from simulators.clock import VirtualClock
from simulators.devices.device import (
    INITIAL_BATTERY_RANGE_PERCENT,
    RandomStream,
    derive_identity,
    device_rng,
)
from simulators.devices.link import Channel, DeviceLink

DEFAULT_NAME: Final = "LUNA 3"
# Nothing public gives a FOREO's MTU: the BLE default.
DEFAULT_MTU_SIZE: Final = 23
# Battery drain while vibrating at full speed (an estimate for the simulation only: a
# handheld massager runs a few hours on a charge); scaled by speed / 10.
DRAIN_PERCENT_PER_S_AT_FULL: Final = 100.0 / (3 * 3600)
FULL_SPEED: Final = 10
TICK_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class ForeoWrite:
    """One write the device received: when (virtual seconds) and the bytes."""

    at_s: float
    data: bytes


class SimulatedForeo:
    """One FOREO device on a :class:`VirtualClock` (see the module doc).

    ``name`` is the advertised name (one of Buttplug's, e.g. ``"LUNA 3"`` or ``"UFO 2"``).
    """

    def __init__(
        self,
        clock: VirtualClock,
        *,
        name: str = DEFAULT_NAME,
        seed: int = 0,
        index: int = 0,
        battery_percent: float | None = None,
        mtu_size: int = DEFAULT_MTU_SIZE,
    ) -> None:
        if not name:
            raise ValueError("a FOREO device advertises a name")
        self.clock = clock
        self.seed = seed
        self.index = index
        self.identity = derive_identity(seed, index, "FOREO", "FOREO")
        self._name = name
        self.mtu_size = mtu_size
        self.radio_rng = device_rng(seed, index, RandomStream.RADIO)
        if battery_percent is None:
            rng = device_rng(seed, index, RandomStream.BATTERY)
            battery_percent = float(rng.uniform(*INITIAL_BATTERY_RANGE_PERCENT))
        if not 0 < battery_percent <= 100:
            raise ValueError(f"battery must be in (0, 100] percent, got {battery_percent}")
        self._charge_percent = float(battery_percent)
        self._charge_at_s = clock.now_s()
        self._powered = False
        self._task: asyncio.Task[None] | None = None
        self._battery_notified: int | None = None
        self._link: DeviceLink | None = None
        self.presence_listeners: list[Callable[[], None]] = []
        self.mode_byte: int | None = None  # from the last packet it read
        self.speed = 0
        self.writes: list[ForeoWrite] = []
        self.speed_log: list[tuple[float, int]] = []  # (virtual time, speed) at each change
        self.malformed_writes = 0

    # ------------------------------------------------------------------ identity

    @property
    def address(self) -> str:
        return self.identity.address

    @property
    def name(self) -> str:
        return self._name

    @property
    def serial_number(self) -> str:
        """Not exposed over the air (nothing public says the device has one); the
        simulator's own label for logs."""
        return self.identity.serial_number

    @property
    def battery_percent(self) -> int:
        return max(0, min(100, round(self._charge_now())))

    @property
    def is_powered(self) -> bool:
        return self._powered

    @property
    def is_connected(self) -> bool:
        return self._link is not None

    @property
    def link(self) -> DeviceLink | None:
        return self._link

    @property
    def motor_on(self) -> bool:
        return self.speed > 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._powered:
            return
        self._powered = True
        self._charge_at_s = self.clock.now_s()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"SimulatedForeo {self.address}"
        )
        self._presence_changed()

    async def stop(self) -> None:
        self.power_off()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def task_exception(self) -> BaseException | None:
        """What the firmware loop died of, if it did."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def _run(self) -> None:
        start_s = self.clock.now_s()
        tick = 0
        while self._powered:
            tick += 1
            await self.clock.sleep_until(start_s + tick * TICK_S)
            self._tick()

    def _tick(self) -> None:
        percent = self.battery_percent
        if percent != self._battery_notified and self._link is not None:
            self._battery_notified = percent
            self._link.send(Channel.BATTERY, bytes([percent]))

    def power_off(self) -> None:
        """The power button: the motor stops and the link closes."""
        if not self._powered:
            return
        self._set_speed(0)
        self._powered = False
        link, self._link = self._link, None
        if link is not None:
            link.device_closed()
        self._presence_changed()

    # ------------------------------------------------------------------ links

    def attach_link(self, link: DeviceLink) -> None:
        if self._link is not None:
            raise RuntimeError(f"{self.name} ({self.address}) is already connected")
        if not self._powered:
            raise RuntimeError(f"{self.name} ({self.address}) is powered off")
        self._link = link
        self._presence_changed()

    def detach_link(self) -> None:
        """The link is gone; the motor keeps its speed (see the module doc)."""
        self._link = None
        self._presence_changed()

    def _presence_changed(self) -> None:
        for listener in self.presence_listeners:
            listener()

    def receive(self, channel: Channel, data: bytes) -> None:
        """A write from the host: only the control characteristic takes writes."""
        if not self._powered or channel is not Channel.CONTROL:
            return
        now_s = self.clock.now_s()
        self.writes.append(ForeoWrite(now_s, bytes(data)))
        try:
            packet = VibratePacket.decode(bytes(data))
        except ProtocolError:
            self.malformed_writes += 1
            return
        self.mode_byte = packet.mode
        self._set_speed(packet.speed)

    # ------------------------------------------------------------------ motor and battery

    def _set_speed(self, speed: int) -> None:
        if speed == self.speed:
            return
        self._charge_percent = self._charge_now()
        self._charge_at_s = self.clock.now_s()
        self.speed = speed
        self.speed_log.append((self._charge_at_s, speed))

    def _charge_now(self) -> float:
        running_s = max(0.0, self.clock.now_s() - self._charge_at_s)
        drain = DRAIN_PERCENT_PER_S_AT_FULL * self.speed / FULL_SPEED * running_s
        return max(0.0, self._charge_percent - drain)

    def max_speed_between(self, start_s: float, end_s: float) -> int:
        """The highest speed the motor ran at in ``[start_s, end_s)`` (virtual time)."""
        top = 0
        for at_s, value in self.speed_log:
            if at_s <= start_s:
                top = value  # the speed running when the window opens
            elif at_s < end_s:
                top = max(top, value)
        return top
