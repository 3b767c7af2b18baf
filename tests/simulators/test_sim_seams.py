"""The seams of a simulated device: faults and scenarios change what it does without
replacing any of its methods, compose in any order, and come and go while it runs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from protocols import (
    Ack,
    Command,
    MassageMode,
    Opcode,
    Ping,
    SetIntensity,
    SetMode,
    SetZone,
    StartStream,
    Zone,
)
from simulators import Channel, DeviceLink, HandScript, SimulatedMassager, VirtualClock
from simulators.devices.device import CommandProceed
from simulators.faults.injector import FaultInjector
from simulators.faults.link import FaultyLink
from simulators.faults.spec import make_fault
from simulators.links.serial_port import PtySerialPort
from simulators.scenario.hand import ScenarioHand

from .conftest import Commander, RecordingLink


def telemetry_count(link: RecordingLink) -> int:
    return sum(1 for channel, _ in link.messages if channel is Channel.TELEMETRY)


@pytest.mark.parametrize("drop_first", [True, False])
async def test_two_injectors_both_act_on_what_the_device_sends(drop_first: bool) -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock, seed=1)
    drop = FaultInjector(device, seed=1, faults=[make_fault("drop", rate=1.0)])
    duplicate = FaultInjector(device, seed=1, faults=[make_fault("duplicate", rate=1.0)])
    for injector in (drop, duplicate) if drop_first else (duplicate, drop):
        injector.install()
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    Commander(device, link)(StartStream())
    await clock.advance(1.0)
    await device.stop()
    assert telemetry_count(link) == 0  # every batch dropped, whichever layer is outside
    assert drop.counts["drop"] > 0
    assert device.link is link


@pytest.mark.parametrize("faults_first", [True, False])
async def test_an_ignored_zone_does_not_move_a_guided_hand_in_either_order(
    faults_first: bool,
) -> None:
    clock = VirtualClock()
    hand = ScenarioHand([], guided=True)
    device = SimulatedMassager(clock, hand=hand)  # type: ignore[arg-type]
    injector = FaultInjector(
        device, seed=0, faults=[make_fault("ignore_commands", opcodes=["SET_ZONE"], duration_s=1)]
    )
    if faults_first:
        injector.install()
        hand.follow(device)
    else:
        hand.follow(device)
        injector.install()
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    assert command(SetZone(Zone.CHIN)).ok  # acknowledged...
    assert hand.commanded_zone == Zone.NONE  # ...not applied: the hand stays where it was
    assert device.zone == Zone.NONE
    await clock.advance(1.5)
    assert command(SetZone(Zone.NECK)).ok
    assert hand.commanded_zone == Zone.NECK
    assert device.zone == Zone.NECK
    await device.stop()


async def test_a_command_held_back_applies_when_delivered_and_a_dropped_one_never() -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock, hand=HandScript.idle(), batch_interval_s=0.1)
    held: list[Command] = []

    def slow_intensity(command: Command, proceed: CommandProceed) -> Ack | None:
        if command.opcode == Opcode.SET_INTENSITY:
            held.append(command)
            return None  # no ack yet: delivered later
        if command.opcode == Opcode.SET_MODE and command.command_id == 9:
            return None  # lost on the way
        return proceed(command)

    device.command_interceptors.append(slow_intensity)
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    assert command(SetMode(MassageMode.VIBRATION)).ok
    assert command.raw(Command.of(2, SetIntensity(5)).encode()) is None
    await clock.advance(0.5)
    assert device.intensity == 0
    applied_from = device.next_sequence
    device.deliver_command(held.pop(), after=slow_intensity)
    assert link.acks()[-1].command_id == 2
    assert device.intensity == 5
    assert command.raw(Command.of(9, SetMode(MassageMode.PULSE)).encode()) is None
    assert device.mode == MassageMode.VIBRATION
    await clock.advance(0.5)
    await device.stop()
    intensities = device.ring.range(0, device.next_sequence)[1]["intensity"]
    assert set(intensities[:applied_from].tolist()) == {0}
    assert set(intensities[applied_from:].tolist()) == {5}
    assert device.commands_received == 3  # delivered late, received once


async def test_a_sample_filter_changes_what_the_ring_keeps_until_removed() -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock, hand=HandScript.constant(Zone.CHIN, 8.0))
    seen: list[tuple[float, int]] = []

    def clipped(
        times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]
    ) -> npt.NDArray[np.void]:
        seen.append((float(times_s[0]), int(samples.shape[0])))
        samples["pressure_dapa"] = np.minimum(samples["pressure_dapa"], 100)
        return samples

    device.sample_filters.append(clipped)
    device.start()
    await clock.advance(1.0)
    device.sample_filters.remove(clipped)
    await clock.advance(1.0)
    await device.stop()
    pressure = device.ring.range(0, device.next_sequence)[1]["pressure_dapa"]
    assert pressure[:100].max() == 100
    assert pressure[100:].min() > 100
    assert seen[0] == (0.0, 10)  # sample times in seconds since boot, a tick's worth
    assert sum(count for _, count in seen) == 100


class CountingLayer:
    """A link layer that counts what goes through it."""

    def __init__(self, inner: DeviceLink) -> None:
        self.inner = inner
        self.sent = 0
        self.detached_too = False

    @property
    def max_payload_bytes(self) -> int:
        return self.inner.max_payload_bytes

    def send(self, channel: Channel, message: bytes) -> None:
        self.sent += 1
        self.inner.send(channel, message)

    def device_closed(self) -> None:
        self.inner.device_closed()

    def detached(self) -> None:
        self.detached_too = True


async def test_link_wrappers_come_and_go_while_a_link_is_attached() -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock)
    layers: list[CountingLayer] = []

    def counting(link: DeviceLink) -> CountingLayer:
        layers.append(CountingLayer(link))
        return layers[-1]

    def counting_too(link: DeviceLink) -> CountingLayer:
        return counting(link)

    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    command(StartStream())
    before = len(link.messages)  # the ack and the BOOT event
    device.add_link_wrapper(counting)  # wraps the link attached now
    await clock.advance(0.5)
    inner = layers[0]
    assert inner.sent == len(link.messages) - before > 0
    device.add_link_wrapper(counting_too)
    outer = layers[1]
    assert outer.inner is inner
    device.remove_link_wrapper(counting)  # the outer layer is made again around the link
    assert inner.detached_too
    assert outer.detached_too
    assert layers[2].inner is link
    await clock.advance(0.5)
    assert layers[2].sent > 0
    assert device.link is link
    assert device.link_wrappers == (counting_too,)
    device.detach_link()
    assert layers[2].detached_too
    device.attach_link(link)  # a new link gets the wrappers there are now
    assert len(layers) == 4
    assert layers[3].inner is link
    command(Ping())
    assert layers[3].sent == 1
    await device.stop()


async def test_an_injector_comes_off_the_device_with_its_faults() -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock, hand=HandScript.constant(Zone.CHIN, 8.0))
    injector = FaultInjector(
        device,
        seed=0,
        faults=[make_fault("drop", rate=1.0), make_fault("stuck_sensor", value=1.0)],
    )
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    injector.start()
    Commander(device, link)(StartStream())
    await clock.advance(1.0)
    assert telemetry_count(link) == 0
    assert isinstance(injector.wrap_link(link), FaultyLink)
    injector.uninstall()
    assert device.sample_filters == []
    assert device.command_interceptors == []
    assert device.link_wrappers == ()
    await clock.advance(1.0)
    await device.stop()
    assert telemetry_count(link) > 0
    pressure = device.ring.range(0, device.next_sequence)[1]["pressure_dapa"]
    assert set(pressure[:100].tolist()) == {100}  # stuck at 1 kPa
    assert pressure[100:].min() > 100


def test_a_faults_own_random_stream_replays_and_leaves_the_devices_alone() -> None:
    clock = VirtualClock()
    first, again = (SimulatedMassager(clock, seed=9, index=3) for _ in range(2))
    other_fault = SimulatedMassager(clock, seed=9, index=3).random_stream(7, 1)
    drawn = first.random_stream(7, 0).random(5)
    assert drawn.tolist() == again.random_stream(7, 0).random(5).tolist()
    assert drawn.tolist() != other_fault.random(5).tolist()
    # The device's own streams are where they were: the same identity and sensor draws.
    fresh = SimulatedMassager(clock, seed=9, index=3)
    assert first.serial_number == fresh.serial_number
    assert first.sensor_rng.random() == fresh.sensor_rng.random()


async def test_clock_drift_on_a_serial_port() -> None:
    # The drift runs the firmware's clock only: the port still works on the world's clock.
    clock = VirtualClock()
    device = SimulatedMassager(clock)
    port = PtySerialPort(device)
    device.start()
    await port.start()
    injector = FaultInjector(device, seed=0, faults=[make_fault("clock_drift", ppm=50_000)])
    injector.start()
    await clock.advance(10.0)
    assert device.next_sequence == 1050  # 10 s of a clock 5 % fast, at 100 Hz
    assert device.firmware_clock is not clock
    injector.uninstall()
    assert device.firmware_clock is clock
    await port.stop()
    await device.stop()
