"""Massagers of one world that take their samples together, in one vectorised tick.

Each device keeps its own sampling loop (:meth:`SimulatedDevice._run`): it wakes on its
tick, sends its stream and its backfill. What a fleet changes is where the samples come
from: the first member of a tick cohort (same firmware clock, boot time and batch interval,
so the same tick times) to wake at a tick takes the samples due of every member of the
cohort at once, with :func:`~simulators.devices.massager.generate_massagers` (one numpy
call for the hands and sensors of all of them); the others find theirs taken. A device on
its own goes through the same function with one device, so a seed gives the same bytes
either way (``tests/simulators/test_sim_fleet.py``).

Taking a cohort member's samples a little earlier within the same virtual instant changes
nothing: a sample is due strictly before its tick, and whatever changes a device's
sampling (a command, a button, another hand) takes the samples due first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from simulators.devices.massager import generate_massagers

if TYPE_CHECKING:
    from simulators.devices.device import SampleSpan
    from simulators.devices.massager import SimulatedMassager

# The fleet remembers when it last took each cohort's samples; cohorts come and go with
# reboots, so it forgets them all past this many.
COHORTS_REMEMBERED: Final = 1024


class MassagerFleet:
    """The massagers of a world, sampled together at their ticks."""

    def __init__(self) -> None:
        self.members: list[SimulatedMassager] = []
        self._taken_at_s: dict[tuple[int, float, float], float] = {}
        # Cohort ticks taken, and the blocks of samples taken in them with other devices'
        # (for tests and benches).
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

    def catch_up(self, device: SimulatedMassager) -> bool:
        """``device``'s tick: the samples due of its whole cohort, if no member took them at
        this instant yet; returns whether ``device`` is still powered."""
        if len(self.members) < 2:
            return device.catch_up()  # a fleet of one
        cohort = device.tick_cohort
        now_s = device.firmware_clock.now_s()
        if self._taken_at_s.get(cohort) == now_s:
            # Taken with the cohort a moment ago (anything still due, when the device was
            # not sampling then, is taken alone).
            return device.catch_up()
        if len(self._taken_at_s) >= COHORTS_REMEMBERED:
            self._taken_at_s.clear()
        self._taken_at_s[cohort] = now_s
        self.ticks += 1
        spans: dict[SampleSpan, list[SimulatedMassager]] = {}
        for member in self.members:
            if member.is_sampling and member.tick_cohort == cohort:
                span = member.due_span()
                if span is not None:
                    spans.setdefault(span, []).append(member)
        powered = device.is_powered
        for span, group in spans.items():
            times_s = span.times_s()
            if len(group) > 1:
                self.blocks_together += len(group)
            for member, samples in zip(group, generate_massagers(group, times_s), strict=True):
                still_powered = member.take_samples(times_s, samples)
                if member is device:
                    powered = still_powered
        return powered
