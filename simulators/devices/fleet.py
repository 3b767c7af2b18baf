"""Massagers of one world that take their samples together, in one vectorised tick.

Devices of a tick cohort (same firmware clock, boot time and batch interval, so the same
tick times) share one sampling loop, a :class:`_CohortTicker`, where each device on its
own wakes a task of its own (:meth:`SimulatedDevice.sample_from_tick`). At each tick it
takes the samples due of the whole cohort at once, with
:func:`~simulators.devices.massager.generate_massagers` (one numpy call for the hands and
sensors of all of them), then each member, in the order they joined, sends its own
(:meth:`SimulatedDevice.send_pending`). A device on its own goes through the same
function with one device, so a seed gives the same bytes either way
(``tests/simulators/test_sim_fleet.py``). A member whose cohort changes (its firmware
clock is replaced) or that leaves the fleet goes on with a loop of its own from its next
tick.

Taking a cohort member's samples a little earlier within the same virtual instant changes
nothing: a sample is due strictly before its tick, and whatever changes a device's
sampling (a command, a button, another hand) takes the samples due first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from simulators.devices.massager import generate_massagers

if TYPE_CHECKING:
    from simulators.devices.device import FirmwareClock, SampleSpan
    from simulators.devices.massager import SimulatedMassager

TickCohort = tuple[int, float, float]


class MassagerFleet:
    """The massagers of a world, sampled together at their ticks."""

    def __init__(self) -> None:
        self.members: list[SimulatedMassager] = []
        self._tickers: dict[TickCohort, _CohortTicker] = {}
        # Cohort ticks, and the blocks of samples taken in them with other devices' (for
        # tests and benches).
        self.ticks = 0
        self.blocks_together = 0

    def add(self, device: SimulatedMassager) -> None:
        """``device`` takes its samples with the fleet from its next tick on."""
        if device.fleet is not None and device.fleet is not self:
            raise ValueError(f"{device.serial_number} is in another fleet already")
        device.fleet = self
        if device not in self.members:
            self.members.append(device)

    def remove(self, device: SimulatedMassager) -> None:
        """``device`` takes its samples on its own again."""
        if device in self.members:
            self.members.remove(device)
        if device.fleet is self:
            device.fleet = None

    async def sample(self, device: SimulatedMassager) -> None:
        """``device``'s sampling loop (from its boot on): ticked with its cohort, then on
        its own if it leaves the cohort while powered."""
        if len(self.members) < 2:
            await device.sample_from_tick(1)  # a fleet of one: nothing to take together
            return
        cohort = device.tick_cohort
        ticker = self._tickers.get(cohort)
        if ticker is None:
            ticker = _CohortTicker(self, cohort, device.firmware_clock, device.boot_s)
            self._tickers[cohort] = ticker
        next_tick = await ticker.tick_with_cohort(device)
        if next_tick is not None:
            await device.sample_from_tick(next_tick)

    def _ticker_ended(self, ticker: _CohortTicker) -> None:
        if self._tickers.get(ticker.cohort) is ticker:
            del self._tickers[ticker.cohort]

    def take_together(self, devices: Sequence[SimulatedMassager]) -> None:
        """The samples due of ``devices`` (a cohort at its tick) that are sampling, those
        due over the same span in one call of ``generate_massagers``."""
        self.ticks += 1
        spans: dict[SampleSpan, list[SimulatedMassager]] = {}
        for device in devices:
            if device.is_sampling:
                span = device.due_span()
                if span is not None:
                    spans.setdefault(span, []).append(device)
        for span, group in spans.items():
            times_s = span.times_s()
            if len(group) > 1:
                self.blocks_together += len(group)
            for device, samples in zip(group, generate_massagers(group, times_s), strict=True):
                device.take_samples(times_s, samples)


class _CohortTicker:
    """One sampling loop for the devices of a tick cohort: one wake a tick for all."""

    def __init__(
        self, fleet: MassagerFleet, cohort: TickCohort, clock: FirmwareClock, boot_s: float
    ) -> None:
        self.fleet = fleet
        self.cohort = cohort
        self._clock = clock
        self._boot_s = boot_s
        self._interval_s = cohort[2]
        # Each member's way out of the loop, in the order they joined: ``None`` once it is
        # off, else the tick it goes on from alone.
        self._members: dict[SimulatedMassager, asyncio.Future[int | None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def tick_with_cohort(self, device: SimulatedMassager) -> int | None:
        """Until ``device`` is off (``None``) or leaves the cohort (its next tick)."""
        loop = asyncio.get_running_loop()
        way_out: asyncio.Future[int | None] = loop.create_future()
        self._members[device] = way_out
        if self._task is None:
            self._task = loop.create_task(self._run(), name=f"fleet ticker {self.cohort}")
        try:
            return await way_out
        finally:
            # Also when the device's own task is cancelled (stop()).
            if self._members.get(device) is way_out:
                del self._members[device]
            if not self._members:
                self._end()

    async def _run(self) -> None:
        tick = 0
        while self._members:
            tick += 1
            # Multiply rather than accumulate, as SimulatedDevice.sample_from_tick does.
            await self._clock.sleep_until(self._boot_s + tick * self._interval_s)
            members = [device for device, way_out in self._members.items() if not way_out.done()]
            try:
                self.fleet.take_together(members)
            except Exception as exc:  # every member's task ends with it, as its own tick would
                for failed in self._members.values():
                    if not failed.done():
                        failed.set_exception(exc)
                continue
            for device in members:
                way_out = self._members.get(device)
                if way_out is None or way_out.done():
                    continue  # cancelled with its device's task (by another's tick)
                try:
                    device.send_pending()  # its samples are taken: it sends them
                except Exception as exc:  # the device's own task ends with it
                    way_out.set_exception(exc)
                    continue
                if not device.is_powered:
                    way_out.set_result(None)
                elif device.fleet is not self.fleet or device.tick_cohort != self.cohort:
                    way_out.set_result(tick + 1)

    def _end(self) -> None:
        self.fleet._ticker_ended(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
