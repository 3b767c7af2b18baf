"""The massager's firmware: hand-driven pressure, contact, zones, battery and buttons."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import (
    EventCode,
    MassageMode,
    SetIntensity,
    SetMode,
    SetZone,
    ShutdownEvent,
    StartStream,
    Zone,
)
from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_FLAG_MOTOR_ON, pressure_kpa
from simulators import HandScript, HandSegment, SimulatedWorld, VirtualClock
from simulators.devices.device import BATTERY_LOW_PERCENT, Button, Press, ShutdownReason
from simulators.devices.hand import ZONE_PRESSURE_BANDS_KPA

from .conftest import Commander, RecordingLink


def events_of(device: object, code: EventCode) -> list:
    return [e for e in device.events if e.code == code]  # type: ignore[attr-defined]


async def test_constant_press_reads_pressure_contact_zone(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(hand=HandScript.constant(Zone.CHEEK_LEFT, 8.0))
    await clock.advance(2.0)
    _, samples = massager.ring.range(10, 190)
    pressure = pressure_kpa(samples)
    assert abs(float(pressure.mean()) - 8.0) < 0.1
    assert 0.05 < float(pressure.std()) < 0.6
    assert np.all(samples["flags"] & MASSAGER_FLAG_CONTACT)
    assert np.all(samples["zone"] == Zone.CHEEK_LEFT)
    assert massager.contact
    assert massager.zone == Zone.CHEEK_LEFT


async def test_hand_script_timeline_drives_events(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    hand = HandScript(
        [
            HandSegment(1.0, 2.0, Zone.FOREHEAD, 4.0, 10.0),
            HandSegment(4.0, 2.0, Zone.CHIN, 12.0),
        ]
    )
    massager = world.add_massager(hand=hand)
    await clock.advance(7.0)
    contact = [
        (e.device_time_ms, e.payload) for e in events_of(massager, EventCode.CONTACT_CHANGED)
    ]
    assert contact == [(1000, b"\x01"), (3000, b"\x00"), (4000, b"\x01"), (6000, b"\x00")]
    zones = [(e.device_time_ms, e.payload[0]) for e in events_of(massager, EventCode.ZONE_CHANGED)]
    assert zones == [(1000, Zone.FOREHEAD), (4000, Zone.CHIN)]
    _, ramp = massager.ring.range(100, 200)
    ramp_kpa = pressure_kpa(ramp)
    assert ramp_kpa[:20].mean() < 5.0 < 9.0 < ramp_kpa[-20:].mean()
    # Lifted: the zone stays what it was, pressure is noise around zero.
    _, lifted = massager.ring.range(310, 80)
    assert np.all(lifted["zone"] == Zone.FOREHEAD)
    assert float(pressure_kpa(lifted).max()) < 0.15


async def test_set_zone_holds_until_the_hand_moves(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    hand = HandScript(
        [HandSegment(0.0, 2.0, Zone.CHEEK_LEFT, 6.0), HandSegment(2.0, 2.0, Zone.CHEEK_RIGHT, 6.0)]
    )
    massager = world.add_massager(hand=hand)
    link = RecordingLink()
    massager.attach_link(link)
    await clock.advance(1.0)
    Commander(massager, link)(SetZone(Zone.NASOLABIAL_LEFT))
    await clock.advance(0.5)
    assert massager.zone == Zone.NASOLABIAL_LEFT
    await clock.advance(1.0)
    assert massager.zone == Zone.CHEEK_RIGHT


async def test_default_hand_stays_inside_zone_bands() -> None:
    hand = HandScript.default(seed=7)
    assert hand.loop
    assert len({s.zone for s in hand.segments}) == len(ZONE_PRESSURE_BANDS_KPA)
    for segment in hand.segments:
        low, high = ZONE_PRESSURE_BANDS_KPA[segment.zone]
        assert low <= segment.pressure_from_kpa <= high
        assert low <= segment.final_pressure_kpa <= high
    assert HandScript.default(seed=7).segments == hand.segments
    assert HandScript.default(seed=8).segments != hand.segments


def test_hand_script_validation() -> None:
    with pytest.raises(ValueError, match="overlap"):
        HandScript([HandSegment(0, 2, Zone.CHIN, 5), HandSegment(1, 2, Zone.CHIN, 5)])
    with pytest.raises(ValueError, match="positive"):
        HandScript([HandSegment(0, 0, Zone.CHIN, 5)])
    with pytest.raises(ValueError, match="negative"):
        HandScript([HandSegment(0, 1, Zone.CHIN, -1)])


async def test_battery_drains_faster_at_higher_intensity(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    idle = world.add_massager(battery_percent=80.0, hand=HandScript.idle())
    low = world.add_massager(battery_percent=80.0, hand=HandScript.idle())
    high = world.add_massager(battery_percent=80.0, hand=HandScript.idle())
    for device, level in ((low, 2), (high, 10)):
        command = Commander(device, RecordingLink())
        device.attach_link(command.link)
        command(SetIntensity(level))
        command(SetMode(MassageMode.VIBRATION))
    await clock.advance(60.0)
    used = [80.0 - d.battery_charge_percent for d in (idle, low, high)]
    assert 0 < used[0] < used[1] < used[2]
    assert used[2] == pytest.approx(5 * (used[1] - used[0]) + used[0], rel=1e-6)


async def test_battery_low_then_shutdown_at_empty(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(battery_percent=BATTERY_LOW_PERCENT + 0.2)
    link = RecordingLink()
    massager.attach_link(link)
    command = Commander(massager, link)
    command(SetIntensity(10))
    command(SetMode(MassageMode.PERCUSSION))
    command(StartStream())
    assert await clock.run_until(lambda: not massager.is_powered, max_virtual_s=800.0)
    assert [e.payload for e in events_of(massager, EventCode.BATTERY_LOW)] == [b"\x0a"]
    shutdown = events_of(massager, EventCode.SHUTDOWN)
    # The reason, and how many samples this boot took (the host counts what it missed).
    assert [ShutdownEvent.decode(e.payload) for e in shutdown] == [
        ShutdownEvent(ShutdownReason.BATTERY_EMPTY, massager.next_sequence)
    ]
    assert link.closed
    assert not massager.is_connected
    assert link.events()[-1].code == EventCode.SHUTDOWN  # sent before the radio went off
    battery_levels = [m[0] for c, m in link.messages if c.name == "BATTERY"]
    assert battery_levels[-1] == 0
    assert battery_levels == sorted(battery_levels, reverse=True)
    sequence = massager.next_sequence
    await clock.advance(1.0)
    assert massager.next_sequence == sequence  # no sampling while off
    assert not world.is_connectable(massager)


async def test_buttons(world: SimulatedWorld, clock: VirtualClock) -> None:
    massager = world.add_massager()
    massager.press_power()
    assert (massager.intensity, massager.mode) == (3, MassageMode.VIBRATION)
    massager.press_power()
    assert massager.intensity == 4
    massager.press_mode()
    assert massager.mode == MassageMode.PERCUSSION
    massager.press_power(long_press=True)
    assert not massager.motor_on
    massager.press_power()
    assert (massager.intensity, massager.mode) == (4, MassageMode.PERCUSSION)
    presses = [tuple(e.payload) for e in events_of(massager, EventCode.BUTTON)]
    assert presses == [
        (Button.POWER, Press.SHORT),
        (Button.POWER, Press.SHORT),
        (Button.MODE, Press.SHORT),
        (Button.POWER, Press.LONG),
        (Button.POWER, Press.SHORT),
    ]
    await clock.advance(0.2)
    _, samples = massager.ring.range(massager.next_sequence - 1, 1)
    assert samples["flags"][0] & MASSAGER_FLAG_MOTOR_ON


async def test_skin_temperature_near_baseline_in_contact(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(hand=HandScript.constant(Zone.FOREHEAD, 6.0))
    await clock.advance(120.0)
    _, samples = massager.ring.range(massager.next_sequence - 100, 100)
    temperature_c = samples["skin_temperature_centi_c"].astype(float) / 100
    assert abs(float(temperature_c.mean()) - 33.4) < 0.6
